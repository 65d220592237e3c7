"""TIES-Merging: trim, elect sign, disjoint merge (METHODS.md §2.3), with DARE first where `dare_p` > 0."""
from __future__ import annotations

from dataclasses import dataclass

from taskmerge import merging
from taskmerge.merging.task_vectors import apply
from taskmerge.merging.ties import MERGES
from taskmerge.runs.data_free import (DareSettings, Merge, Run, chosen_coefficient, dare_experts,
                                      flattened_keys)
from taskmerge.runs.registry import Method, declare
from taskmerge.runs.reporting import dare_part, key_set_part, num, on_val
from taskmerge.runs.script_configs import VAL_GRIDS, merge_config, surgery_config
from taskmerge.runs.settings import setting


@dataclass
class TiesMerge(DareSettings):
    preset: str = setting(choices=merging.TIES_PRESETS)
    k: float | None = setting(gt=0.0, le=1.0)
    merge: str | None = setting(choices=MERGES)
    scaling_coef: float | None = setting(finite=True)
    val_grid: str = setting(choices=VAL_GRIDS)


def ties_settings(s: TiesMerge) -> dict:
    """The preset's k / merge / λ, each replaced by the setting that is not None."""
    settings = dict(merging.TIES_PRESETS[s.preset])
    for value, name in ((s.k, "k"), (s.merge, "merge"), (s.scaling_coef, "lam")):
        if value is not None:
            settings[name] = value
    return settings


def merge_ties(run: Run, settings: TiesMerge) -> Merge:
    s = ties_settings(settings)
    run.log.info(f"TIES settings: {s}")
    pretrained, experts, prefix, dare = dare_experts(run, settings)
    keys, key_set = flattened_keys(run)
    delta = merging.ties_delta(pretrained, experts, k=s["k"], merge=s["merge"], validate_inputs=False,
                               keys=keys)
    lam, curve = chosen_coefficient(run, s["lam"], s["lam"] is None, settings.val_grid, delta)
    suffix = "_vision" if keys is not None else ""
    return Merge(f"{prefix}ties_{s['merge']}_k{s['k']}_{lam}{suffix}", apply(pretrained, delta, lam),
                 extra={**dare, "ties": s, **key_set, "scaling_coef": lam, "val_curve": curve})


def label(report: dict) -> str:
    ties = report["ties"]
    return (f"ties_merging ({dare_part(report)}{ties.get('merge')}, K {num(ties.get('k'))}, "
            f"λ {num(report.get('scaling_coef'))}{on_val(report)}{key_set_part(report)})")


METHOD = declare(Method("ties_merging", TiesMerge, merge_ties, label, script="main_TiesMerging.py",
                        bases={"ties_merging": {}}, coefficient_keys=("scaling_coef", "ties", "dare")))
TiesMergingConfig = merge_config(METHOD)
TiesMergingSurgeryConfig = surgery_config(METHOD)
