"""Task vectors τ_t = θ_t − θ0, key by key (METHODS.md §0).

A state dict here is any `Mapping[str, Tensor]`: a dict, or a lazy reader that loads one tensor per
`reader[key]`, or any flat span of it with `read_flat` (`checkpoints.open_state_dict`). Experts are
passed as `{task: state dict}` in task order. Nothing in this module holds a whole model unless
asked to (`TaskVector.materialize`): a merge reads one key — for elementwise methods one `CHUNK` of
a key — of each expert at a time, so its peak memory does not grow with the number of tasks.

Arithmetic runs in float32 (float16/bfloat16 weights are upcast; float64 stays float64) and merged
weights are cast back to the pre-trained dtype. Keys whose pre-trained tensor is not floating point
(int64/uint8 buffers, which task_vectors' `TaskVector` skips) are never merged: `apply` copies them.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Mapping

import torch

from taskmerge.storage.checkpoints import validate_experts

StateDict = Mapping[str, torch.Tensor]
Experts = Mapping[str, StateDict]


def as_float(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in the dtype merge arithmetic runs in: float32, or float64 if it already is."""
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def _dtype(state_dict: StateDict, key: str) -> torch.dtype:
    # Lazy readers know a tensor's dtype from the file header; a dict has the tensor at hand.
    return state_dict.dtype(key) if hasattr(state_dict, "dtype") else state_dict[key].dtype


def float_dtype(state_dict: StateDict, key: str) -> torch.dtype:
    """The dtype `as_float` gives `state_dict[key]`, from the header alone for lazy readers."""
    return torch.promote_types(_dtype(state_dict, key), torch.float32)


def shape_of(state_dict: StateDict, key: str) -> tuple[int, ...]:
    return tuple(state_dict.shape(key) if hasattr(state_dict, "shape") else state_dict[key].shape)


def merged_keys(pretrained: StateDict) -> list[str]:
    """The keys that carry a task vector: floating-point tensors, in the pre-trained order."""
    return [k for k in pretrained.keys() if _dtype(pretrained, k).is_floating_point]


def flattened_keys(pretrained: StateDict, keys: Iterable[str] | None) -> list[str]:
    """The keys a global (cross-key) statistic ranges over: `keys` in θ0's order, or every merged key
    when None. A key outside them is not merged at all (it keeps θ0 under `apply`), as FusionBench
    never sees the keys its CLIPVisionModel lacks."""
    every = merged_keys(pretrained)
    if keys is None:
        return every
    wanted = set(keys)
    unknown = sorted(wanted.difference(every))
    if unknown:
        raise ValueError(f"keys {unknown[:3]} are not floating-point keys of the pre-trained model")
    return [k for k in every if k in wanted]


# open_clip fuses an attention block's q, k and v projections into one `in_proj` (q rows first, then
# k, then v: hf_checkpoints.py builds it by that concatenation); FusionBench's CLIPVisionModel keeps
# q_proj, k_proj and v_proj as three tensors, and every per-tensor statistic sees them apart.
QKV_MODES = ("fused", "separate")
FUSED_QKV = ("attn.in_proj_weight", "attn.in_proj_bias")


def qkv_parts(key: str, qkv: str) -> int:
    """How many tensors `key` is to a per-tensor method: 3 for the fused q/k/v in separate mode."""
    if qkv not in QKV_MODES:
        raise ValueError(f"qkv={qkv!r}: expected one of {QKV_MODES}")
    return 3 if qkv == "separate" and key.endswith(FUSED_QKV) else 1


def row_blocks(key: str, rows: int, qkv: str) -> list[slice]:
    """The row ranges merged as separate matrices: all rows, or q, k, v's thirds of in_proj."""
    parts = qkv_parts(key, qkv)
    if rows % parts:
        raise ValueError(f"{key}: {rows} rows do not split into {parts} equal q/k/v blocks")
    size = rows // parts
    return [slice(i * size, (i + 1) * size) for i in range(parts)]


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


# Elementwise merges walk large keys in flat chunks of this many elements (a multiple of 8, so that
# bit-packed masks of consecutive chunks concatenate): their temporaries then stay at a few chunks
# instead of a few copies of the largest tensor (the text token embedding: 25M floats in ViT-B/32),
# and a chunk's operands stay in cache across the T experts (1 MiB each: Σ τ of 8 ViT-B/32
# experts took 1.9–2.0 s with this size, 3.0 s with 8 MiB chunks and 2.5–2.7 s with 256 KiB).
CHUNK = 1 << 18
Span = tuple[int, int]


def numel_of(state_dict: StateDict, key: str) -> int:
    return torch.Size(shape_of(state_dict, key)).numel()


def chunks(numel: int, size: int | None = None) -> Iterator[Span]:
    """[start, stop) spans of at most `size` (default `CHUNK`) covering range(numel), every start
    a multiple of 8."""
    size = CHUNK if size is None else size
    size = max(8, size - size % 8)
    for start in range(0, numel, size):
        yield start, min(start + size, numel)
    if numel == 0:
        yield 0, 0


def read_flat(state_dict: StateDict, key: str, span: Span | None = None) -> torch.Tensor:
    """state_dict[key], or only elements [start, stop) of it flattened; lazy readers read just
    those bytes. A dict's tensor comes back as a view: callers must not write to it."""
    if span is None:
        return state_dict[key]
    if hasattr(state_dict, "read_flat"):
        return state_dict.read_flat(key, *span)
    return state_dict[key].reshape(-1)[span[0]:span[1]]


def taus_at(theta0: torch.Tensor, finetuned: Experts, key: str,
            span: Span | None = None) -> Iterator[torch.Tensor]:
    """τ_t[key] = θ_t[key] − θ0[key] for each task in order, one tensor alive at a time; with
    `span`, the flat chunk [start, stop) of it (θ0 then holds that chunk). Each is a new tensor."""
    for expert in finetuned.values():
        yield as_float(read_flat(expert, key, span)) - theta0


class TaskVector(Mapping[str, torch.Tensor]):
    """A task vector computed key by key on access; `+`, `-` and scalar `*` stay lazy.

    `compute(key)` must return a tensor nobody else holds (every access computes a new one), so
    consumers such as `apply` may reuse it in place.

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
    """Σ_t τ_t, lazily; θ0[key] is read once per key, not once per task, chunk by chunk."""
    def compute(key: str) -> torch.Tensor:
        shape = shape_of(pretrained, key)
        total = torch.empty(shape, dtype=float_dtype(pretrained, key))
        flat = total.view(-1)
        for start, stop in chunks(flat.numel()):
            taus = taus_at(as_float(read_flat(pretrained, key, (start, stop))), finetuned, key,
                           (start, stop))
            acc = flat[start:stop]
            acc.copy_(next(taus))
            for tau in taus:
                acc += tau
        return total
    return TaskVector(merged_keys(pretrained), compute)


def apply(pretrained: StateDict, delta: StateDict, coef: float = 1.0,
          consume: bool = False) -> dict[str, torch.Tensor]:
    """θ = θ0 + coef·delta, per key, in the pre-trained dtype; keys not in `delta` keep θ0.

    `consume=True` takes a delta dict the caller no longer needs and empties it key by key, so a
    full delta and the full θ never sit in memory together.
    """
    owned = consume or isinstance(delta, TaskVector)  # each tensor we get is ours to overwrite
    out = {}
    for key in pretrained.keys():
        theta0 = pretrained[key]
        if key in delta:
            tau = delta.pop(key) if consume else delta[key]
            base = as_float(theta0)
            if owned and tau.dtype == base.dtype and tau.shape == base.shape:
                # coef·τ + θ0 rounds exactly as θ0 + coef·τ, without two model-sized temporaries
                out[key] = tau.mul_(coef).add_(base).to(theta0.dtype)
            else:
                out[key] = (base + coef * tau).to(theta0.dtype)
        else:
            out[key] = theta0.clone()
    return out


def task_magnitudes(pretrained: StateDict, finetuned: Experts, keys: list[str]) -> Iterator[torch.Tensor]:
    """|τ_t| over `keys` flattened into one vector, for each task in turn: the trim and clamp
    quantiles of TIES and PCB. One buffer is refilled chunk by chunk for every task (yielded, not
    copied), so the peak is one model-sized vector whatever the number of tasks."""
    sizes = [numel_of(pretrained, key) for key in keys]
    magnitudes = torch.empty(sum(sizes), dtype=float_dtype(pretrained, keys[0]))
    for expert in finetuned.values():
        offset = 0
        for key, size in zip(keys, sizes):
            for start, stop in chunks(size):
                theta0 = as_float(read_flat(pretrained, key, (start, stop)))
                theta_t = as_float(read_flat(expert, key, (start, stop)))
                out = magnitudes[offset + start:offset + stop]
                torch.sub(theta_t.to(out.dtype), theta0.to(out.dtype), out=out).abs_()
            offset += size
        yield magnitudes
