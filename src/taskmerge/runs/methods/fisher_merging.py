"""Fisher merging (Matena & Raffel 2022), FusionBench's CLIP recipe: each expert's diagonal Fisher
on a sample of its task's training images, then the Fisher-weighted mean (merging/fisher.py; the
statistics in adaptive/statistics.py, cached per expert by runs/train_statistics.py)."""
from __future__ import annotations

from dataclasses import dataclass

from taskmerge.adaptive.statistics import FISHER_ESTIMATES, diagonal_fisher
from taskmerge.merging.fisher import FisherAccumulator
from taskmerge.runs.data_free import Merge, Run
from taskmerge.runs.identity import head_digest
from taskmerge.runs.registry import Method, declare
from taskmerge.runs.reporting import num
from taskmerge.runs.script_configs import merge_config, surgery_config
from taskmerge.runs.settings import setting
from taskmerge.runs.setup import fresh_encoder
from taskmerge.runs.train_statistics import (expert_statistics, keys_digest, megabytes, merged_key_set,
                                             model_bytes, sample_images, sample_split)

ESTIMATE_NAMES = {"fusionbench": "FusionBench's √p·log p batch estimate",
                  "empirical": "empirical Fisher, true labels"}


@dataclass
class FisherMerge:
    num_fisher_examples: int = setting(ge=1)
    fisher_batch_size: int = setting(ge=1)
    fisher_estimate: str = setting(choices=FISHER_ESTIMATES)
    normalize_fisher_weight: bool = setting()
    minimal_fisher_weight: float = setting(ge=0.0, finite=True)
    sample_seed: int = setting(ge=0)


def merge_fisher(run: Run, s: FisherMerge) -> Merge:
    pretrained, experts = run.experts()
    keys, key_set = merged_key_set(run)
    one = model_bytes(run, keys)
    run.log.info(f"Fisher merging: {s.num_fisher_examples} training images per task (seed {s.sample_seed}), "
                 f"{ESTIMATE_NAMES[s.fisher_estimate]}, batches of {s.fisher_batch_size}; {len(keys)} keys "
                 f"merged. Memory plan: Σ c·F·θ and Σ c·F ({megabytes(2 * one)}) + one expert's Fisher, "
                 f"weights and gradients ({megabytes(3 * one)}), whatever the number of tasks")
    acc = FisherAccumulator(pretrained, keys, minimal_weight=s.minimal_fisher_weight,
                            normalize=s.normalize_fisher_weight)
    samples = {t: sample_split(run, t, s.num_fisher_examples, s.sample_seed, "num_fisher_examples")
               for t in run.setup.tasks}
    for task in run.setup.tasks:
        sample, identity = samples[task]
        key = {"data": identity, "head": head_digest(run.heads[task]), "estimate": s.fisher_estimate,
               "batch_size": s.fisher_batch_size, "keys": keys_digest(keys)}
        fisher = expert_statistics(run, "fisher", task, key, lambda: diagonal_fisher(
            fresh_encoder(run.setup, experts[task]), run.heads[task], sample_images(run, task, sample), keys,
            estimate=s.fisher_estimate, batch_size=s.fisher_batch_size, device=run.setup.device,
            desc=f"Fisher {task}"))
        acc.add(experts[task], fisher)
        del fisher
    run.log.info("Fisher weights c_t (1 / ‖F_t‖, before the common normalisation): "
                 + ", ".join(f"{t} {c:.4g}" for t, c in zip(run.setup.tasks, acc.weights)))
    extra = {"num_fisher_examples": s.num_fisher_examples, "fisher_estimate": s.fisher_estimate,
             "normalize_fisher_weight": s.normalize_fisher_weight,
             "minimal_fisher_weight": s.minimal_fisher_weight, "fisher_batch_size": s.fisher_batch_size,
             "sample_seed": s.sample_seed, **key_set,
             "fisher_weights": dict(zip(run.setup.tasks, acc.weights))}
    return Merge(f"fisher_merging_n{s.num_fisher_examples}", acc.merged(), extra=extra)


def label(report: dict) -> str:
    estimate = "" if report.get("fisher_estimate") == "fusionbench" else f"{report.get('fisher_estimate')}, "
    return f"fisher_merging ({estimate}{num(report.get('num_fisher_examples'))} examples per task)"


METHOD = declare(Method("fisher_merging", FisherMerge, merge_fisher, label, script="main_FisherMerging.py",
                        bases={"fisher_merging": {}}, derived=("fisher_weights",),
                        coefficient_keys=("num_fisher_examples", "fisher_estimate")))
FisherMergingConfig = merge_config(METHOD)
FisherMergingSurgeryConfig = surgery_config(METHOD)
