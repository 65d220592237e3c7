"""TALL masks (per-task models) and Consensus (one merged model) (METHODS.md §2.6)."""
from __future__ import annotations

from dataclasses import dataclass

from taskmerge import merging
from taskmerge.merging.tall_masks import load_released_masks
from taskmerge.merging.task_vectors import apply
from taskmerge.runs.data_free import Merge, Run, chosen_coefficient, flattened_keys
from taskmerge.runs.evaluation import evaluate
from taskmerge.runs.registry import Method, declare
from taskmerge.runs.reporting import key_set_part, merge_name, num, on_val
from taskmerge.runs.script_configs import VAL_GRIDS, merge_config, surgery_config
from taskmerge.runs.selection import select_per_task
from taskmerge.runs.settings import setting
from taskmerge.runs.setup import encoder_for, evaluation_split, released_masks_path
from taskmerge.storage.errors import ConfigError


@dataclass
class TallMasksMerge:
    method: str = setting(choices=("tall_mask", "consensus"))
    use_ties: bool = setting()
    tall_lambdas: list[float] = setting(ge=0.0, finite=True, nonempty=True, unique=True)
    prun_thre_k: int = setting(ge=1)
    alpha: float = setting(finite=True)
    select_on_val: bool = setting()
    val_grid: str = setting(choices=VAL_GRIDS)
    load_mask: bool = setting()                 # read the released TALL_mask_<N>task.npy


def merge_tall_masks(run: Run, s: TallMasksMerge) -> Merge:
    method, use_ties, k = s.method, s.use_ties, s.prun_thre_k
    tasks, lams = run.setup.tasks, list(s.tall_lambdas)
    if method == "consensus" and k > len(tasks):
        raise ConfigError(f"setting prun_thre_k={k} is not allowed with {len(tasks)} tasks: consensus "
                          f"keeps the weights that at least k tasks select (1 <= k <= {len(tasks)})")
    pretrained, experts = run.experts()
    keys, key_set = flattened_keys(run) if use_ties else (None, {})
    tau_mtl = merging.multitask_vector(pretrained, experts, use_ties, validate_inputs=False, keys=keys)
    suffix = "_use_ties" if use_ties else ""
    if s.load_mask:  # the released masks instead of choosing λ per task (tall_masks' load_mask=True)
        path = released_masks_path(run.setup, use_ties)
        run.log.info(f"Loading the released TALL masks from {path}")
        tall = load_released_masks(path, pretrained, tau_mtl, tasks, use_ties)
        extra = {"masks_loaded_from": path, "use_ties": use_ties, "storage": tall.storage_report()}
    else:
        tall, extra = _choose_tall_masks(run, lams, pretrained, experts, tau_mtl, use_ties)
    extra.update(key_set)
    if method == "tall_mask":
        return Merge(f"TALL_mask_{len(tasks)}task{suffix}", tall, per_task=True, extra=extra)
    mask = merging.consensus_mask(tall, k)
    delta = {key: tau * mask[key] for key, tau in tall.tau_mtl.items()}
    kept = sum(int(m.sum()) for m in mask.values()) / max(sum(m.numel() for m in mask.values()), 1)
    run.log.info(f"Consensus k={k}: keeps {100 * kept:.2f}% of the multi-task vector's entries")
    alpha, curve = chosen_coefficient(run, s.alpha, s.select_on_val, s.val_grid, delta)
    return Merge(f"consensus_k{k}_{alpha}{suffix}", apply(pretrained, delta, alpha),
                 extra={**extra, "alpha": alpha, "prun_thre_k": k, "kept_fraction": kept,
                        "val_curve": curve})


def _choose_tall_masks(run: Run, lams: list[float], pretrained, experts, tau_mtl, use_ties: bool):
    """Each task's mask at the λ its <Task>Val accuracy chooses (the originals' default path)."""
    tasks = run.setup.tasks

    def task_model(task, lam):
        mask = merging.tall_mask(pretrained, experts[task], tau_mtl, lam)
        return apply(pretrained, {k: v * mask[k] for k, v in tau_mtl.items()}, 1.0)

    def task_val_acc(task, sd):
        data, loader = evaluation_split(run.setup, task, "val")
        return evaluate(encoder_for(run.setup, sd), run.heads[task], data, run.batch_size,
                        device=run.setup.device, loader=loader)

    run.log.info(f"Choosing each task's TALL λ on its <Task>Val split over {lams}")
    chosen, lam_curve = select_per_task(lams, tasks, task_model, task_val_acc, run.log.info)
    tall = merging.tall_masks(pretrained, experts, [chosen[t] for t in tasks], tau_mtl=tau_mtl,
                              use_ties=use_ties, validate_inputs=False)
    return tall, {"tall_lambdas": chosen, "tall_val_curve": lam_curve, "use_ties": use_ties,
                  "storage": tall.storage_report()}


def label(report: dict) -> str:
    ties = "TIES τ_MTL, " if report.get("use_ties") else ""
    if merge_name(report).startswith("TALL_mask"):
        return f"tall_mask ({ties}λ per task on val{key_set_part(report)})"
    if "prun_thre_k" in report:
        alpha = num(report.get("alpha"))
        return (f"consensus ({ties}k {report['prun_thre_k']}, α {alpha}{on_val(report)}"
                f"{key_set_part(report)})")
    return str(report.get("method"))


METHOD = declare(Method("tall_masks", TallMasksMerge, merge_tall_masks, label, script="main_TallMasks.py",
                        bases={"consensus": {"method": "consensus"}},
                        task_identity=lambda report: merge_name(report).startswith("TALL_mask"),
                        coefficient_keys=("alpha", "tall_lambdas", "prun_thre_k"),
                        derived=("tall_val_curve",)))
TallMasksConfig = merge_config(METHOD)
TallMasksSurgeryConfig = surgery_config(METHOD)
