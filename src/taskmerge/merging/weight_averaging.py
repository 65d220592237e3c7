"""Weight Averaging (METHODS.md §2.1): θ = (1/T) Σ_t θ_t = θ0 + (1/T) Σ_t τ_t over every key.

`drop_last=True` reproduces the bug of RepresentationSurgery's and AdaMerging's
`merging_cofficient.py`: their coefficient list has T entries instead of T + 1, so zipping it with
the task vectors silently drops the last one (DTD) and the merge is θ0 + (1/T)(τ_1 + … + τ_{T−1}).
The Surgery-v1 "WA" numbers are that merge. SurgeryV2 and tall_masks/TSV average all T.
"""
from __future__ import annotations

import torch

from taskmerge.merging.task_vectors import Experts, StateDict, apply, sum_of_task_vectors, validate


def weight_averaging(pretrained: StateDict, finetuned: Experts, drop_last: bool = False,
                     validate_inputs: bool = True) -> dict[str, torch.Tensor]:
    """θ0 + (1/T) Σ τ_t; `drop_last` leaves the last expert's τ out but keeps the weight 1/T."""
    if validate_inputs:
        validate(pretrained, finetuned)
    num_tasks = len(finetuned)
    used = dict(list(finetuned.items())[:-1]) if drop_last else finetuned
    if not used:  # T = 1 with the bug: nothing left to add
        return apply(pretrained, {}, 0.0)
    return apply(pretrained, sum_of_task_vectors(pretrained, used), 1.0 / num_tasks)
