"""Task Arithmetic: θ = θ0 + λ Σ τ_t (METHODS.md §2.2), with DARE first where `dare_p` > 0."""
from __future__ import annotations

from dataclasses import dataclass

from taskmerge import merging
from taskmerge.merging.task_vectors import apply
from taskmerge.runs.data_free import DareSettings, Merge, Run, chosen_coefficient, dare_experts
from taskmerge.runs.registry import Method, declare
from taskmerge.runs.reporting import dare_part, num, on_val
from taskmerge.runs.script_configs import VAL_GRIDS, merge_config, surgery_config
from taskmerge.runs.settings import setting


@dataclass
class TaskArithmeticMerge(DareSettings):
    scaling_coef: float = setting(finite=True)
    select_on_val: bool = setting()
    val_grid: str = setting(choices=VAL_GRIDS)


def merge_task_arithmetic(run: Run, s: TaskArithmeticMerge) -> Merge:
    pretrained, experts, prefix, dare = dare_experts(run, s)
    tau_sum = merging.multitask_vector(pretrained, experts, validate_inputs=False)
    lam, curve = chosen_coefficient(run, s.scaling_coef, s.select_on_val, s.val_grid, tau_sum)
    run.log.info(f"scaling_coef:{lam}")
    return Merge(f"{prefix}task_arithmetic_{lam}", apply(pretrained, tau_sum, lam),
                 extra={**dare, "scaling_coef": lam, "val_curve": curve})


def label(report: dict) -> str:
    return f"task_arithmetic ({dare_part(report)}λ {num(report['scaling_coef'])}{on_val(report)})"


METHOD = declare(Method("task_arithmetic", TaskArithmeticMerge, merge_task_arithmetic, label,
                        script="main_TaskArithmetic.py", bases={"task_arithmetic": {}},
                        coefficient_keys=("scaling_coef", "dare")))
TaskArithmeticConfig = merge_config(METHOD)
TaskArithmeticSurgeryConfig = surgery_config(METHOD)
