"""WUDI-Merging: task vectors as the data's stand-in, a per-layer least-squares merge (METHODS_RECORDS.md)."""
from __future__ import annotations

from dataclasses import dataclass

from taskmerge import merging
from taskmerge.merging.wudi import SOLVERS as WUDI_SOLVERS
from taskmerge.runs.data_free import Merge, Run, attention_layout, qkv_field, qkv_mode, qkv_suffix
from taskmerge.runs.registry import Method, declare
from taskmerge.runs.reporting import num, qkv_part
from taskmerge.runs.script_configs import QKV_SETTINGS, merge_config, surgery_config
from taskmerge.runs.settings import setting
from taskmerge.storage.errors import ConfigError


@dataclass
class WUDIMerge:
    wudi_preset: str = setting(choices=merging.WUDI_PRESETS)
    wudi_solver: str = setting(choices=WUDI_SOLVERS)
    wudi_steps: int | None = setting(ge=0)
    wudi_lr: float = setting(gt=0.0, finite=True)
    wudi_ridge: float = setting(ge=0.0, finite=True)
    qkv: str = setting(choices=QKV_SETTINGS)

    def check_together(self):
        if self.wudi_ridge > 0 and self.wudi_solver != "closed_form":
            raise ConfigError(f"setting wudi_ridge={self.wudi_ridge} is not allowed with wudi_solver="
                              f"{self.wudi_solver!r}: the ridge regularises the closed form only "
                              f"(set wudi_ridge=0.0, or wudi_solver='closed_form')")


def wudi_settings(s: WUDIMerge) -> dict:
    """The preset's solver settings with the script's; Adam's steps and lr only where Adam runs."""
    settings = {**merging.WUDI_PRESETS[s.wudi_preset], "solver": s.wudi_solver, "lr": s.wudi_lr}
    if s.wudi_steps is not None:
        settings["steps"] = s.wudi_steps
    if s.wudi_solver == "closed_form":
        del settings["steps"], settings["lr"]
        settings["ridge"] = s.wudi_ridge
    return {"preset": s.wudi_preset, **settings}


def merge_wudi(run: Run, s: WUDIMerge) -> Merge:
    w = wudi_settings(s)
    qkv = qkv_mode(run, s.qkv, fusionbench_preset=s.wudi_preset == "fusionbench")
    run.log.info(f"WUDI settings: {w}")
    run.log.info(attention_layout(run, qkv))
    pretrained, experts = run.experts()
    merged = merging.wudi_merging(pretrained, experts, solver=w["solver"], steps=w.get("steps", 0),
                                  lr=w.get("lr", 1.0), keys=w["keys"], others=w["others"],
                                  ridge=w.get("ridge", 0.0), validate_inputs=False, qkv=qkv)
    steps = f"_{w['steps']}" if "steps" in w else ""
    return Merge(f"wudi_{w['preset']}_{w['solver']}{steps}{qkv_suffix(qkv)}", merged,
                 extra={"wudi": w, **qkv_field(qkv)})


def label(report: dict) -> str:
    wudi = report["wudi"]
    solver = (f"Adam {wudi.get('steps')} steps" if wudi.get("solver") == "adam"
              else "closed form" + (f", ridge {num(wudi['ridge'])}" if wudi.get("ridge") else ""))
    return f"wudi_merging ({wudi.get('preset')}, {solver}{qkv_part(report)})"


METHOD = declare(Method("wudi_merging", WUDIMerge, merge_wudi, label, script="main_WUDIMerging.py",
                        bases={"wudi_merging": {}}, coefficient_keys=("wudi",)))
WUDIMergingConfig = merge_config(METHOD)
WUDIMergingSurgeryConfig = surgery_config(METHOD)
