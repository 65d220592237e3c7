"""The typed config of every entry script, and the names its settings may take.

One dataclass per script kind, built from the script's top-level variables by `settings.from_values`
(see runs/cli.py). The fields have no defaults: the scripts' variables are the one source of every
default, a script that misses a field or carries an unknown one is refused with its name, and
tests/test_script_configs.py builds each script's variables into its config. Each field declares its
type (the annotation) and its range or choices (`setting(...)`); `check_together` holds the rules
between fields. A merge method's own settings are declared with the method (runs/registry.py,
runs/methods/); its scripts' configs are these classes with its settings added (`Method.config`,
`Method.surgery_config`).
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from taskmerge import merging
from taskmerge.adaptive.surgery import ZERO_GRAD_MODES
from taskmerge.compute import cpu_paths
from taskmerge.merging.task_arithmetic import LAM_GRID_TALL, LAM_GRID_TSV
from taskmerge.merging.task_vectors import QKV_MODES
from taskmerge.runs.settings import setting
from taskmerge.runs.setup import DATA_FORMATS, resolve_tasks
from taskmerge.storage.errors import ConfigError

# The coefficient grids a `val_grid` setting names (choosing λ / α on the <Task>Val splits).
VAL_GRIDS = {"tall_masks": LAM_GRID_TALL, "tsv": LAM_GRID_TSV, "tsv_alpha": merging.TSV_ALPHA_GRID}
# AdaMerging method_name → (coefficient granularity, TIES-selected source vectors?)
ADAMERGING = {"tw_adamerging": ("task", False), "lw_adamerging": ("layer", False),
              "tw_adamergingpp": ("task", True), "lw_adamergingpp": ("layer", True)}
COEFFICIENT_SOURCES = ("learn", "published", "auto")   # or a saved .json
# How a per-tensor method sees attention's q/k/v: "auto" is "separate" on the fusionbench family
# (FusionBench's CLIPVisionModel has q_proj, k_proj, v_proj) and "fused" (open_clip's in_proj, the
# originals') elsewhere, except WUDI's fusionbench preset, which is FusionBench's merge everywhere.
QKV_SETTINGS = ("auto",) + QKV_MODES


@dataclass
class RunConfig:
    """What every evaluating script sets: the model, its checkpoints and data, the log."""
    model_name: str = setting(nonempty=True)
    checkpoint_dir: str = setting(nonempty=True)
    data_location: str = setting(nonempty=True)
    data_format: str = setting(choices=DATA_FORMATS)    # the real tasks' format; embedded ignores it
    trust_label_order: bool = setting()         # data whose class names match none of ours: accepted
    tasks: list[str] | str = setting(unique=True)       # []: the model's benchmark; or "TALL14"/"TALL20"/…
    log_dir: str = setting(nonempty=True)
    cache_dir: str = setting(nonempty=True)    # "auto": the model folder, or the user's cache if read-only
    batch_size: int = setting(ge=1)
    device: str = setting(nonempty=True)       # "auto" | "cpu" | "cuda" | "cuda:<i>" (checked when resolved)
    tf32: bool = setting()                     # TF32 matmuls on CUDA (compute/devices.py)
    num_workers: int = setting(ge=0, words=("auto",))   # DataLoader workers; "auto": 0 on CPU
    threads: int = setting(ge=1, words=("auto",))       # torch's CPU threads; "auto": compute/devices.py
    cpu_paths: str = setting(choices=cpu_paths.SETTINGS)  # "auto": pinned for the embedded model on CPU
    rendezvous_timeout: float = setting(gt=0)           # torchrun: seconds a rank waits for the others

    def check_together(self):
        resolve_tasks(self.tasks)  # a name must be one of the benchmarks
        method_rules = getattr(super(), "check_together", None)  # the method's *Merge, next in the MRO
        if method_rules is not None:
            method_rules()


@dataclass
class SingleTaskEvalConfig(RunConfig):
    split: str = setting(choices=("test", "val"))
    model_file: str = setting()                # "": none; else a saved model (.safetensors) evaluated too

    def check_together(self):
        super().check_together()
        if self.model_file and not os.path.isfile(self.model_file):
            raise ConfigError(f"setting model_file={self.model_file!r}: no such file; give a model saved "
                              f"by a merge's or Traditional MTL's save_dir (.safetensors), or \"\" for none")


@dataclass
class MergeRunConfig(RunConfig):
    save_dir: str = setting()                  # "" skips saving


# --- the data-dependent scripts: AdaMerging, Surgery ---
@dataclass
class TrainingRunConfig(MergeRunConfig):
    """What every training run sets besides the merge: where it resumes from, its seed."""
    resume_dir: str = setting()                # "" disables resuming
    seed: int = setting(ge=0)
    checkpoint_every: int = setting(ge=1)


@dataclass
class AdaMergingSettings:
    """AdaMerging's own settings (runs/methods/adamerging.py declares the method)."""
    method_name: str = setting(choices=ADAMERGING)
    coefficients: str = setting(choices=COEFFICIENT_SOURCES, suffix=".json")
    prior: float = setting(ge=0.0, le=1.0)     # the initial λ
    clamp: bool = setting()                    # λ kept in [0, 1] (the originals); False: FusionBench's
    adamerging_steps: int = setting(ge=1)
    adamerging_lr: float = setting(gt=0.0, finite=True)
    adamerging_eval_every: int = setting(ge=1)

    def check_together(self):
        if self.coefficients not in COEFFICIENT_SOURCES and not os.path.isfile(self.coefficients):
            raise ConfigError(f"setting coefficients={self.coefficients!r}: no such file; give a saved "
                              f"coefficients .json, or one of {', '.join(map(repr, COEFFICIENT_SOURCES))}")


@dataclass
class AdaMergingRunConfig(TrainingRunConfig, AdaMergingSettings):
    """main_AdaMerging.py's config."""


@dataclass
class SurgerySettings:
    """Representation Surgery's own settings (v1, online, SurgeryV2)."""
    surgery: str = setting(choices=("v1", "v2"))
    rank: int = setting(ge=1, words=("auto",))   # "auto": the SurgeryV2 original's per model
    iterations: int = setting(ge=1)
    eval_iterations: int = setting(ge=1)
    lr: float = setting(gt=0.0, finite=True)
    zero_grad_mode: str = setting(choices=ZERO_GRAD_MODES)
    online: bool = setting()
    feature_cache: str = setting()             # "" : <cache folder>/feature_cache

    def check_together(self):
        if self.online and self.surgery == "v2":
            raise ConfigError("setting online=True is not allowed with surgery='v2': the online "
                              "protocol exists for Surgery v1 only (set online=False, or surgery='v1')")
        base_rules = getattr(super(), "check_together", None)  # the base method's, next in the MRO
        if base_rules is not None:
            base_rules()


@dataclass
class SurgeryRunConfig(TrainingRunConfig, SurgerySettings):
    """A Surgery run without its base: each base's Surgery config (`surgery_config`) adds the base
    method's own settings and `method_name`."""


# --- a declared method's scripts (runs/registry.py Method): where they run plus its settings ---
_CONFIGS: dict[tuple, type] = {}


def merge_config(method) -> type:
    """The typed config of a data-free method's entry script: where the run goes (MergeRunConfig)
    and the method's settings; `method_key` names the method."""
    key = ("merge", method.name, method.settings)
    if key not in _CONFIGS:
        _CONFIGS[key] = dataclasses.make_dataclass(f"{method.stem}Config", [],
                                                   bases=(MergeRunConfig, method.settings),
                                                   namespace={"method_key": method.name})
    return _CONFIGS[key]


def surgery_config(method) -> type:
    """The typed config of a Surgery run on one of the method's bases: the run, the training,
    Surgery's settings and the method's own, plus `method_name` (one of its bases) unless its
    settings already name the base (AdaMerging's)."""
    key = ("surgery", method.name, method.settings, tuple(method.bases))
    if key not in _CONFIGS:
        own = {f.name for f in dataclasses.fields(method.settings)}
        extra = [] if "method_name" in own else [
            ("method_name", str, setting(choices=tuple(method.bases)))]
        _CONFIGS[key] = dataclasses.make_dataclass(f"{method.stem}SurgeryConfig", extra,
                                                   bases=(SurgeryRunConfig, method.settings),
                                                   namespace={"method_key": method.name})
    return _CONFIGS[key]


# --- the two scripts that prepare checkpoints ---
@dataclass
class BuildBenchmarkConfig:
    checkpoint_dir: str = setting(nonempty=True)
    data_location: str = setting(nonempty=True)
    micro: bool = setting()
    progress: bool = setting()


@dataclass
class ConvertCheckpointsConfig:
    checkpoint_dir: str = setting(nonempty=True)
    model_name: str = setting(nonempty=True)
    tasks: list[str] | str = setting(nonempty=True, unique=True)   # or a benchmark name ("TALL20")
    family: str = setting(choices=("task_vectors", "tall_masks", "auto"))
    out_dir: str | None = setting(nonempty=True)

    def check_together(self):
        resolve_tasks(self.tasks)


# --- the script that reads the reports back ---
@dataclass
class SummaryConfig:
    log_dir: str = setting(nonempty=True)
    model: str = setting()
    family: str = setting()
    method: str = setting()
    csv_path: str = setting()
