"""The two scripts that prepare checkpoints rather than run a method: building the embedded
benchmark, and converting the original pickled checkpoints to safetensors. Each prints its full
configuration first, like every run's log."""
from __future__ import annotations

import json
from dataclasses import asdict

from taskmerge.embedded.build import ensure_embedded_benchmark, read_manifest, summary
from taskmerge.runs.script_configs import BuildBenchmarkConfig, ConvertCheckpointsConfig, SummaryConfig
from taskmerge.runs.setup import resolve_tasks
from taskmerge.runs.summary import summarize
from taskmerge.storage.checkpoints import convert_to_safetensors


def _print_config(config) -> None:
    print("Config: " + json.dumps(asdict(config), sort_keys=True, default=str))


def run_build_benchmark(config: BuildBenchmarkConfig, script: str) -> str:
    """Build (or reuse) the embedded benchmark and print its calibration table."""
    _print_config(config)
    folder = ensure_embedded_benchmark(config.checkpoint_dir, config.data_location, micro=config.micro,
                                       progress=config.progress)
    print(f"Embedded benchmark in {folder}")
    print(summary(read_manifest(folder)))
    return folder


def run_convert_checkpoints(config: ConvertCheckpointsConfig, script: str) -> dict:
    """Write the safetensors copies of a model's checkpoints (already converted ones are skipped)."""
    _print_config(config)
    done = convert_to_safetensors(config.checkpoint_dir, config.model_name, resolve_tasks(config.tasks),
                                  out=config.out_dir,
                                  family=config.family)
    print(f"wrote {len(done['written'])} files, skipped {len(done['skipped'])} already converted")
    return done


def run_summary(config: SummaryConfig, script: str):
    """The results tables of every report under `log_dir` (printed), and their CSV."""
    _print_config(config)
    return summarize(config.log_dir, config.csv_path, model=config.model, family=config.family,
                     method=config.method)
