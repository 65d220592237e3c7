"""Task vectors τ_t = θ_t − θ0, key by key (METHODS.md §0).

A state dict here is any `Mapping[str, Tensor]`: a dict, or a lazy reader that loads one tensor per
`reader[key]` (`checkpoints.open_state_dict`). Experts are passed as `{task: state dict}` in task
order. Nothing in this module holds a whole model unless asked to (`TaskVector.materialize`), so a
merge reads one key of each expert at a time and its peak memory does not grow with the number of
tasks.

Arithmetic runs in float32 (float16/bfloat16 weights are upcast; float64 stays float64) and merged
weights are cast back to the pre-trained dtype. Keys whose pre-trained tensor is not floating point
(int64/uint8 buffers, which task_vectors' `TaskVector` skips) are never merged: `apply` copies them.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Mapping

import torch

from .checkpoints import validate_experts

StateDict = Mapping[str, torch.Tensor]
Experts = Mapping[str, StateDict]


def as_float(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in the dtype merge arithmetic runs in: float32, or float64 if it already is."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _dtype(state_dict: StateDict, key: str) -> torch.dtype:
    # Lazy readers know a tensor's dtype from the file header; a dict has the tensor at hand.
    return state_dict.dtype(key) if hasattr(state_dict, "dtype") else state_dict[key].dtype


def shape_of(state_dict: StateDict, key: str) -> tuple[int, ...]:
    return tuple(state_dict.shape(key) if hasattr(state_dict, "shape") else state_dict[key].shape)


def merged_keys(pretrained: StateDict) -> list[str]:
    """The keys that carry a task vector: floating-point tensors, in the pre-trained order."""
    return [k for k in pretrained.keys() if _dtype(pretrained, k).is_floating_point]


def source_name(state_dict: StateDict, fallback: str) -> str:
    return str(getattr(state_dict, "path", None) or fallback)


def validate(pretrained: StateDict, finetuned: Experts) -> list[str]:
    """Fail before any work if the experts do not fit θ0 (keys, shapes, dtypes, NaN/Inf), naming
    the file and the key; return the merged keys."""
    if not isinstance(finetuned, Mapping):
        raise TypeError(f"experts must be a {{task: state dict}} mapping in task order, "
                        f"got a {type(finetuned).__name__}")
    if len(finetuned) == 0:
        raise ValueError("no fine-tuned experts given; pass {task: state dict} with one or more")
    sources = {"pretrained": source_name(pretrained, "the pre-trained model")}
    sources.update({t: source_name(sd, f"the {t} checkpoint") for t, sd in finetuned.items()})
    validate_experts(pretrained, finetuned, sources)
    return merged_keys(pretrained)


def taus_at(theta0: torch.Tensor, finetuned: Experts, key: str) -> Iterator[torch.Tensor]:
    """τ_t[key] = θ_t[key] − θ0[key] for each task in order, one tensor alive at a time."""
    for expert in finetuned.values():
        yield as_float(expert[key]) - theta0


class TaskVector(Mapping[str, torch.Tensor]):
    """A task vector computed key by key on access; `+`, `-` and scalar `*` stay lazy.

    `TaskVector.between(θ0, θ_t)` is τ_t; `sum(TaskVector.between(θ0, θ_t) for …)` is Σ τ_t
    without ever holding more than one key of each operand.
    """

    def __init__(self, keys: Iterable[str], compute: Callable[[str], torch.Tensor]):
        self._keys = dict.fromkeys(keys)  # ordered, with O(1) membership
        self._compute = compute

    @classmethod
    def between(cls, pretrained: StateDict, finetuned: StateDict) -> "TaskVector":
        return cls(merged_keys(pretrained),
                   lambda k: as_float(finetuned[k]) - as_float(pretrained[k]))

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        return self._compute(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key) -> bool:  # Mapping's default would compute the tensor
        return key in self._keys

    def __add__(self, other: StateDict) -> "TaskVector":
        return TaskVector(self._keys, lambda k: self[k] + other[k])

    def __radd__(self, other) -> "TaskVector":
        if isinstance(other, (int, float)) and other == 0:  # lets sum() start from 0
            return self
        return NotImplemented

    def __neg__(self) -> "TaskVector":
        return TaskVector(self._keys, lambda k: -self[k])

    def __sub__(self, other: StateDict) -> "TaskVector":
        return TaskVector(self._keys, lambda k: self[k] - other[k])

    def __mul__(self, coef: float) -> "TaskVector":
        return TaskVector(self._keys, lambda k: coef * self[k])

    __rmul__ = __mul__

    def materialize(self) -> dict[str, torch.Tensor]:
        return {k: self[k] for k in self._keys}


def task_vector(pretrained: StateDict, finetuned: StateDict) -> TaskVector:
    """τ = θ_t − θ0 as a lazy `TaskVector`."""
    return TaskVector.between(pretrained, finetuned)


def sum_of_task_vectors(pretrained: StateDict, finetuned: Experts) -> TaskVector:
    """Σ_t τ_t, lazily; θ0[key] is read once per key, not once per task."""
    def compute(key: str) -> torch.Tensor:
        taus = taus_at(as_float(pretrained[key]), finetuned, key)
        total = next(taus)
        for tau in taus:
            total += tau
        return total
    return TaskVector(merged_keys(pretrained), compute)


def apply(pretrained: StateDict, delta: StateDict, coef: float = 1.0,
          consume: bool = False) -> dict[str, torch.Tensor]:
    """θ = θ0 + coef·delta, per key, in the pre-trained dtype; keys not in `delta` keep θ0.

    `consume=True` takes a delta dict the caller no longer needs and empties it key by key, so a
    full delta and the full θ never sit in memory together.
    """
    out = {}
    for key in pretrained.keys():
        theta0 = pretrained[key]
        if key in delta:
            tau = delta.pop(key) if consume else delta[key]
            out[key] = (as_float(theta0) + coef * tau).to(theta0.dtype)
        else:
            out[key] = theta0.clone()
    return out
