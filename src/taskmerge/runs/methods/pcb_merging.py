"""PCB-Merging: parameter competition balancing (METHODS_RECORDS.md)."""
from __future__ import annotations

from dataclasses import dataclass

from taskmerge import merging
from taskmerge.merging.task_vectors import apply
from taskmerge.runs.data_free import Merge, Run, flattened_keys
from taskmerge.runs.registry import Method, declare
from taskmerge.runs.reporting import key_set_part, num
from taskmerge.runs.selection import search_coefficients
from taskmerge.runs.script_configs import merge_config, surgery_config
from taskmerge.runs.settings import setting
from taskmerge.storage.errors import ConfigError


@dataclass
class PCBMerge:
    pcb_ratio: float = setting(gt=0.0, le=1.0)
    pcb_lambda: float = setting(finite=True)     # λ_t of every task when not searched (pcb.py)
    # pcb_ES.py's search of one λ_t per task on <Task>Val (runs/selection.py search_coefficients)
    pcb_search: bool = setting()
    pcb_search_lower: float = setting(finite=True)
    pcb_search_upper: float = setting(finite=True)
    pcb_search_init: float = setting(finite=True)
    pcb_search_budget: int = setting(ge=1)
    pcb_search_seed: int = setting(ge=0)

    def check_together(self):
        if not self.pcb_search_lower < self.pcb_search_upper:
            raise ConfigError(f"settings pcb_search_lower={self.pcb_search_lower} and pcb_search_upper="
                              f"{self.pcb_search_upper} are not a range: lower must be below upper "
                              f"(pcb_ES.py: 0.8 and 1.3)")
        if not self.pcb_search_lower <= self.pcb_search_init <= self.pcb_search_upper:
            raise ConfigError(f"setting pcb_search_init={self.pcb_search_init} is outside "
                              f"[{self.pcb_search_lower}, {self.pcb_search_upper}]: the search starts "
                              f"inside its bounds (pcb_ES.py: 1.0 in [0.8, 1.3])")


def merge_pcb(run: Run, s: PCBMerge) -> Merge:
    """pcb_ES.py's balancing with pcb.py's fixed λ (neither original runs this pair), or with
    pcb_ES.py's own search of one λ_t per task on <Task>Val (`pcb_search`)."""
    pretrained, experts = run.experts()
    keys, key_set = flattened_keys(run)
    suffix = "_vision" if keys is not None else ""
    if not s.pcb_search:
        p = {"ratio": s.pcb_ratio, "lam": s.pcb_lambda}
        run.log.info(f"PCB settings: {p} (pcb_ES.py's balancing, pcb.py's fixed λ_t = {s.pcb_lambda} "
                     f"for every task)")
        merged = merging.pcb_merging(pretrained, experts, s.pcb_ratio, s.pcb_lambda, validate_inputs=False,
                                     keys=keys)
        return Merge(f"pcb_r{s.pcb_ratio}_{s.pcb_lambda}{suffix}", merged, extra={"pcb": p, **key_set})
    search = {"lower": s.pcb_search_lower, "upper": s.pcb_search_upper, "init": s.pcb_search_init,
              "budget": s.pcb_search_budget, "seed": s.pcb_search_seed,
              "optimiser": "(1+1)-ES, one-fifth rule"}
    run.log.info(f"PCB settings: ratio {s.pcb_ratio}; pcb_ES.py's balancing and its λ_t search on the "
                 f"<Task>Val splits (mean absolute ACC), {search}")
    scores = merging.pcb_scores(pretrained, experts, s.pcb_ratio, validate_inputs=False, keys=keys)
    tasks = run.setup.tasks

    def merged_at(lams):
        return apply(pretrained, merging.pcb_combine(pretrained, experts, scores, lams), consume=True)

    lams, curve = search_coefficients(lambda lams: run.evaluate(merged_at(lams), "val"),
                                      [s.pcb_search_init] * len(tasks), s.pcb_search_lower,
                                      s.pcb_search_upper, s.pcb_search_budget, s.pcb_search_seed,
                                      run.log.info)
    chosen = dict(zip(tasks, lams))
    run.log.info(f"Chosen λ_t: {chosen}")
    p = {"ratio": s.pcb_ratio, "search": search, "lams": chosen}
    return Merge(f"pcb_r{s.pcb_ratio}_search{s.pcb_search_budget}_seed{s.pcb_search_seed}{suffix}",
                 merged_at(lams), extra={"pcb": p, **key_set, "val_curve": curve})


def label(report: dict) -> str:
    pcb = report["pcb"]
    if isinstance(pcb.get("search"), dict):
        lams = "λ_t searched on val" + (f" ({pcb['search'].get('budget')} merges)"
                                         if pcb["search"].get("budget") is not None else "")
    else:
        lams = f"fixed λ {num(pcb.get('lam'))}"
    return f"pcb_merging (pcb_ES balancing, {lams}, r {num(pcb.get('ratio'))}{key_set_part(report)})"


METHOD = declare(Method("pcb_merging", PCBMerge, merge_pcb, label, script="main_PCBMerging.py",
                        bases={"pcb_merging": {}}, coefficient_keys=("pcb",)))
PCBMergingConfig = merge_config(METHOD)
PCBMergingSurgeryConfig = surgery_config(METHOD)
