"""Task Arithmetic (METHODS.md §2.2): θ = θ0 + λ Σ_t τ_t over every key.

λ = 0.3 is the EnnengYang/EMR prior (no search). tall_masks/TSV choose λ on the `…Val` splits from
`LAM_GRID_TALL` / `LAM_GRID_TSV` by average normalized validation accuracy; that search lives in
`selection.py`, which can build Σ τ once with `sum_of_task_vectors` and call `apply` per λ.
"""
from __future__ import annotations

import torch

from taskmerge.merging.task_vectors import Experts, StateDict, apply, sum_of_task_vectors, validate

DEFAULT_LAM = 0.3
# tall_masks: linspace(0, 1, n_eval_points // 2 + 1)[1:] with n_eval_points = 21, i.e. 0.1 … 1.0
# (nik-dim/tall_masks src/eval/eval.py); TSV: linspace(0, 1, 31)[1:] = 1/30 … 1.0
LAM_GRID_TALL = [i / 10 for i in range(1, 11)]
LAM_GRID_TSV = [i / 30 for i in range(1, 31)]


def task_arithmetic(pretrained: StateDict, finetuned: Experts, lam: float = DEFAULT_LAM,
                    validate_inputs: bool = True) -> dict[str, torch.Tensor]:
    """The merged θ0 + lam·Σ_t τ_t, key by key (one key of each expert in memory at a time)."""
    if validate_inputs:
        validate(pretrained, finetuned)
    tau_sum = sum_of_task_vectors(pretrained, finetuned)
    return apply(pretrained, tau_sum, lam)
