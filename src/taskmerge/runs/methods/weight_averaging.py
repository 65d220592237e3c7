"""Weight Averaging: θ = θ0 + (1/T) Σ τ_t (METHODS.md §2.1)."""
from __future__ import annotations

from dataclasses import dataclass

from taskmerge import merging
from taskmerge.runs.data_free import Merge, Run
from taskmerge.runs.registry import Method, declare
from taskmerge.runs.script_configs import merge_config, surgery_config
from taskmerge.runs.settings import setting


@dataclass
class WeightAveragingMerge:
    drop_last: bool = setting()


def merge_weight_averaging(run: Run, s: WeightAveragingMerge) -> Merge:
    pretrained, experts = run.experts()
    drop_last = s.drop_last
    merged = merging.weight_averaging(pretrained, experts, drop_last=drop_last, validate_inputs=False)
    return Merge("weight_averaging" + ("_drop_last" if drop_last else ""), merged,
                 extra={"drop_last": drop_last})


def label(report: dict) -> str:
    return "weight_averaging (drop last)" if report.get("drop_last") else "weight_averaging"


METHOD = declare(Method("weight_averaging", WeightAveragingMerge, merge_weight_averaging, label,
                        script="main_WeightAveraging.py", bases={"weight_averaging": {}},
                        coefficient_keys=("drop_last",)))
WeightAveragingConfig = merge_config(METHOD)
WeightAveragingSurgeryConfig = surgery_config(METHOD)
