"""Checks that run before any work, and on every merged model before it is saved or evaluated.

Every checkpoint must fit the architecture's image encoder (keys, shapes) and hold finite values,
and every expert must match the pre-trained model's dtypes: otherwise the first evaluation would
fail in torch with a message naming no file, or report accuracies of a broken model. A merged model
with NaN/Inf values (e.g. `scaling_coef=1e999`) is refused with the method and its coefficient.
Each refusal is one InputError naming the file (or the setting) and the fix.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from taskmerge.compute import distributed
from taskmerge.models.encoders import check_encoder_state
from taskmerge.storage import atomic
from taskmerge.storage.checkpoints import validate_experts
from taskmerge.storage.errors import InputError

def validate_checkpoints(checkpoints, encoder) -> None:
    """Keys and shapes of θ0 and every θ_t against `encoder` (an ImageEncoder of the run's
    architecture), then dtypes against θ0 and finite values, reading one file at a time."""
    pretrained = checkpoints.pretrained()
    check_encoder_state(encoder, pretrained, checkpoints.zeroshot_path)
    experts = {}
    for task in checkpoints.tasks:
        experts[task] = checkpoints.finetuned(task)
        check_encoder_state(encoder, experts[task], checkpoints.finetuned_path(task))
    validate_experts(pretrained, experts, checkpoints.sources, check_values=True)


def first_non_finite(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, int] | None:
    """(key, count) of the first floating tensor with NaN/Inf values, or None."""
    for key, t in state_dict.items():
        if t.is_floating_point() and t.numel():
            low, high = torch.aminmax(t)  # propagate NaN and ±Inf: one reduction, no copy
            if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
                return key, int((~torch.isfinite(t)).sum())
    return None


def check_merged(name: str, model, per_task: bool, extra: Mapping, pretrained,
                 tasks: Sequence[str], coefficient_keys: Sequence[str] = ()) -> None:
    """Refuse a merge result with NaN/Inf values: the one merged θ, or each task's θ_t of a
    per-task method (EMR, TSV-C, TALL masks), built one at a time. The refusal names the
    `coefficient_keys` of `extra` (the method's coefficients, as its declaration lists them)."""
    models = ((t, model.task_state_dict(pretrained, t)) for t in tasks) if per_task else [(None, model)]
    for task, state_dict in models:
        bad = first_non_finite(state_dict)
        if bad is None:
            continue
        settings = ", ".join(f"{k}={extra[k]!r}" for k in coefficient_keys if k in extra)
        where = f" (task {task}'s model)" if task else ""
        raise InputError(
            f"{name}{where}: the merged model has {bad[1]} NaN/Inf values in {bad[0]!r}"
            f"{f' with {settings}' if settings else ''}; choose a finite coefficient of a sensible "
            f"size (the methods' defaults are in METHODS.md); nothing was saved or evaluated")


def check_finite_model(state_dict: Mapping[str, torch.Tensor], what: str, fix: str) -> None:
    bad = first_non_finite(state_dict)
    if bad is not None:
        raise InputError(f"{what}: the merged model has {bad[1]} NaN/Inf values in {bad[0]!r}; {fix}")


OUTPUT_SETTINGS = ("log_dir", "save_dir", "resume_dir", "feature_cache")


def check_output_folders(config, resolved: Mapping[str, str] | None = None) -> None:
    """Every folder the run will write into (those of `OUTPUT_SETTINGS` it sets, and `resolved`
    {setting: folder} ones such as the cache folder) is writable, checked on rank 0 before any work:
    a read-only or full disk is refused in one line naming the setting, not met as an OSError after
    the whole merge. All ranks stop together."""
    error = None
    folders = [(name, getattr(config, name, "")) for name in OUTPUT_SETTINGS]
    try:
        for name, folder in [*folders, *(resolved or {}).items()]:
            if folder:
                atomic.check_writable(folder, name)
    except InputError as e:
        error = e
    distributed.raise_together(error)
