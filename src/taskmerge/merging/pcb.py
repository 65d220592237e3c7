"""PCB-Merging, Parameter Competition Balancing (METHODS_RECORDS.md §6; duguodong7/pcb-merging).

The repository has three code paths that disagree; this is `vision_source_code/pcb_ES.py`, the one
that matches the paper. Over each task's flattened task vector τ_t (d entries: by default every key,
the zero text leftovers included, so they count in the quantiles, as the original flattens task_vectors'
whole checkpoint; `keys` restricts it), with q(x, i) = the i-th smallest of x:
  a_t = clamp(|τ_t|, q(|τ_t|, ⌊0.01·d⌋), q(|τ_t|, ⌊0.99·d⌋ − 1)),  τ̂_t = sign(τ_t)·a_t
  n_t = minmax(a_t) ∈ [0, 1],  ŝ_t = sign(τ_t)·n_t
  β_t = exp(T·n_t²) ⊙ Σ_s tanh(ŝ_t ⊙ ŝ_s)                   (intra- times inter-balancing, s = t included)
  w_t = minmax(clamp(β_t, q(β_t, ⌊(1 − r)·d⌋), max β_t))      (0 below the top fraction r = 0.05)
  θ   = θ0 + Σ_t λ_t τ̂_t ⊙ w_t / max(Σ_t w_t, 1e-12)
λ_t = 1.2 for every task (`pcb.py`); pcb_ES searches λ_t ∈ [0.8, 1.3] on the …Val splits (NGOpt,
budget 100), which belongs with the search (runs/selection.py): `pcb_scores` once, then `pcb_combine`
per λ. A constant row (max = min, e.g. a zero τ_t) would divide by zero in minmax; here it
normalises to 0.

After clamping, a_t's minimum and maximum are the two clamp bounds, so minmax needs no extra pass.
The quantiles are selections (numpy's introselect) instead of sorts, at the originals' exact indices:
|τ_t|'s in one d-sized buffer, task by task; β_t's in two streaming passes (`KthLargest`: a histogram
of each task's β, then only the values of the bin holding the quantile), so memory is flat in T and
far below the original's T × d arrays, and β is computed three times instead of stored.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from taskmerge.merging.task_vectors import (CHUNK, Experts, StateDict, apply, as_float, chunks, float_dtype,
                                            flattened_keys, numel_of, read_flat, shape_of, task_magnitudes,
                                            taus_at, validate)
from taskmerge.storage.errors import ConfigError

LAM = 1.2
RATIO = 0.05
CLAMP = (0.01, 0.99)


def kth_smallest(buffer: torch.Tensor, indices: Sequence[int]) -> list[float]:
    """The values at `indices` of sorted(buffer) (negative indices count from the end); reorders it."""
    flat = buffer.numpy()
    flat.partition(list(indices))
    return [float(flat[i]) for i in indices]


def minmax(x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """(clamp(x, low, high) − low) / (high − low) per row, 0 on a row where high = low."""
    width = high - low
    return (x.clamp(low, high) - low) / torch.where(width > 0, width, 1.0) * (width > 0)


def magnitude_bounds(pretrained: StateDict, finetuned: Experts, keys: list[str]) -> torch.Tensor:
    """(T, 2): each task's clamp bounds q(|τ_t|, ⌊0.01·d⌋) and q(|τ_t|, ⌊0.99·d⌋ − 1)."""
    dim = sum(numel_of(pretrained, key) for key in keys)
    bounds = [kth_smallest(magnitudes, [int(dim * CLAMP[0]), int(dim * CLAMP[1]) - 1])
              for magnitudes in task_magnitudes(pretrained, finetuned, keys)]
    return torch.tensor(bounds, dtype=float_dtype(pretrained, keys[0]))


def clamped(taus: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """τ̂ = sign(τ)·a of a (T, c) chunk of the stacked task vectors."""
    return taus.sign() * taus.abs().clamp(bounds[:, :1], bounds[:, 1:])


def balancing_score(taus: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """β of a (T, c) chunk: exp(T·n²) ⊙ Σ_s tanh(ŝ ⊙ ŝ_s)."""
    low, high = bounds[:, :1], bounds[:, 1:]
    normed = minmax(taus.abs(), low, high)
    signed = taus.sign() * normed
    inter = sum(torch.tanh(signed * signed[s]) for s in range(len(taus)))
    return torch.exp(len(taus) * normed.square()) * inter


BINS = 1 << 16


def _ordered_bins(values: torch.Tensor) -> torch.Tensor:
    """The bin of each float32 value: its 16 high bits, mapped so that the bin order is the value
    order (negative floats have their magnitude bits flipped), in [0, 65536)."""
    bits = values.float().contiguous().view(torch.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered >> 16) + (BINS // 2)


class KthLargest:
    """Exactly the `count`-th largest value and the largest of each of T streams that can be read
    twice, holding a 65,536-bin histogram per stream instead of the values: the first pass counts
    the values per bin (the bin order is the value order), the second keeps only the values of the
    bin where the count-th largest falls, and a selection among them gives it. Memory is flat in T
    and in d (the original sorts T × d arrays)."""

    def __init__(self, num_streams: int, count: int):
        self.count = count
        self.hist = torch.zeros(num_streams, BINS, dtype=torch.int64)
        self.top = torch.full((num_streams,), -float("inf"))
        self.kept: list[torch.Tensor] = []
        self.bin = self.need = None

    def count_pass(self, values: torch.Tensor) -> None:
        """First pass: one (T, c) chunk of the streams."""
        bins = _ordered_bins(values)
        offsets = torch.arange(len(values))[:, None] * BINS
        self.hist += torch.bincount((bins + offsets).view(-1), minlength=len(values) * BINS).view(len(values), BINS)
        self.top = torch.maximum(self.top, values.amax(dim=1).float())

    def _locate(self) -> None:
        above = self.hist.flip(1).cumsum(1).flip(1)   # above[t, b]: values in bins ≥ b
        self.bin = (above >= self.count).sum(1) - 1   # the highest bin with ≥ count values at or above it
        rows = torch.arange(len(self.hist))
        higher = torch.where(self.bin + 1 < BINS, above[rows, (self.bin + 1).clamp(max=BINS - 1)], 0)
        self.need = self.count - higher              # the rank of the wanted value inside its bin

    def keep_pass(self, values: torch.Tensor) -> None:
        """Second pass over the same chunks, in any order."""
        if self.bin is None:
            self._locate()
            # one buffer per stream, of the bin's exact size: many small live tensors between the
            # chunks' large transient ones would fragment the heap (7 GiB peak at 8 tasks)
            sizes = self.hist[torch.arange(len(self.hist)), self.bin]
            self.kept = [torch.empty(int(n), dtype=values.dtype) for n in sizes]
            self.filled = [0] * len(self.kept)
        bins = _ordered_bins(values)
        for t in range(len(values)):
            picked = values[t][bins[t] == self.bin[t]]
            self.kept[t][self.filled[t]:self.filled[t] + picked.numel()] = picked
            self.filled[t] += picked.numel()

    def bounds(self) -> list[list[float]]:
        """[[the count-th largest, the largest]] per stream."""
        return [[kth_smallest(pool, [pool.numel() - int(self.need[t])])[0], float(self.top[t])]
                for t, pool in enumerate(self.kept)]


def stacked_chunks(pretrained: StateDict, finetuned: Experts, keys: list[str]):
    """(key, span, (T, c) task vectors) over every flat chunk of every key, in order."""
    for key in keys:
        for span in chunks(numel_of(pretrained, key)):
            theta0 = as_float(read_flat(pretrained, key, span))
            yield key, span, torch.stack(list(taus_at(theta0, finetuned, key, span)))


@dataclass
class PCBScores:
    """What PCB's weights need besides the experts, computed once: the flattened keys, each task's
    |τ_t| clamp bounds and its β_t bounds. A λ search (pcb_ES.py) reuses them for every λ."""
    keys: list[str]
    bounds: torch.Tensor        # (T, 2)
    beta_bounds: torch.Tensor   # (T, 2)


def pcb_scores(pretrained: StateDict, finetuned: Experts, ratio: float = RATIO,
               validate_inputs: bool = True, keys: list[str] | None = None) -> PCBScores:
    """The clamp and β bounds over the flattened `keys` (None: every floating-point key)."""
    if not 0.0 < ratio <= 1.0:
        raise ConfigError(f"ratio={ratio}: the kept fraction r is in (0, 1] "
                          f"(the original's pcb_ratio: 0.05)")
    if validate_inputs:
        validate(pretrained, finetuned)
    keys = flattened_keys(pretrained, keys)
    bounds = magnitude_bounds(pretrained, finetuned, keys)
    dim = sum(numel_of(pretrained, key) for key in keys)
    count = dim - int(dim * (1 - ratio))  # q(β_t, ⌊(1 − r)·d⌋) is β_t's count-th largest
    if count < 1:
        raise ConfigError(f"ratio={ratio}: keeps no entry of the {dim} task-vector entries; "
                          f"use a larger r")
    largest = KthLargest(len(finetuned), count)
    for _, _, taus in stacked_chunks(pretrained, finetuned, keys):
        largest.count_pass(balancing_score(taus, bounds))
    for _, _, taus in stacked_chunks(pretrained, finetuned, keys):
        largest.keep_pass(balancing_score(taus, bounds))
    return PCBScores(keys, bounds, torch.tensor(largest.bounds(), dtype=bounds.dtype))


def pcb_combine(pretrained: StateDict, finetuned: Experts, scores: PCBScores,
                lams: float | Sequence[float] = LAM) -> dict[str, torch.Tensor]:
    """Σ_t λ_t τ̂_t ⊙ w_t / max(Σ_t w_t, 1e-12) per key of `scores.keys` (one more pass)."""
    num_tasks = len(finetuned)
    lams = [float(lams)] * num_tasks if isinstance(lams, (int, float)) else [float(x) for x in lams]
    if len(lams) != num_tasks:
        raise ConfigError(f"lams has {len(lams)} values for {num_tasks} tasks: give one λ_t per task, "
                          f"or one λ")
    bounds, beta_bounds = scores.bounds, scores.beta_bounds
    lam = torch.tensor(lams, dtype=bounds.dtype)[:, None]
    delta = {}
    for key, (start, stop), taus in stacked_chunks(pretrained, finetuned, scores.keys):
        weights = minmax(balancing_score(taus, bounds), beta_bounds[:, :1], beta_bounds[:, 1:])
        if key not in delta:
            delta[key] = torch.empty(shape_of(pretrained, key), dtype=float_dtype(pretrained, key))
        delta[key].view(-1)[start:stop] = ((lam * clamped(taus, bounds) * weights).sum(0)
                                          / weights.sum(0).clamp(min=1e-12))
    return delta


def pcb_delta(pretrained: StateDict, finetuned: Experts, ratio: float = RATIO,
              lams: float | Sequence[float] = LAM, validate_inputs: bool = True,
              keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Σ_t λ_t τ̂_t ⊙ w_t / max(Σ_t w_t, 1e-12) per key of `keys` (the others keep θ0)."""
    num_tasks = len(finetuned)
    if not isinstance(lams, (int, float)) and len(lams) != num_tasks:
        raise ConfigError(f"lams has {len(lams)} values for {num_tasks} tasks: give one λ_t per task, "
                          f"or one λ")
    scores = pcb_scores(pretrained, finetuned, ratio, validate_inputs, keys)
    return pcb_combine(pretrained, finetuned, scores, lams)


def pcb_merging(pretrained: StateDict, finetuned: Experts, ratio: float = RATIO,
                lams: float | Sequence[float] = LAM, validate_inputs: bool = True,
                keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """θ0 + PCB(τ_1..τ_T), λ_t = 1.2 by default (the original's fixed-λ script)."""
    return apply(pretrained, pcb_delta(pretrained, finetuned, ratio, lams, validate_inputs, keys),
                 consume=True)
