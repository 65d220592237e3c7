"""PCB-Merging, Parameter Competition Balancing (METHODS_RECORDS.md §6; duguodong7/pcb-merging).

The repository has three code paths that disagree; this is `vision_source_code/pcb_ES.py`, the one
that matches the paper. Over each task's flattened task vector τ_t (d entries, every key, the zero
text leftovers included, so they count in the quantiles), with q(x, i) = the i-th smallest of x:
  a_t = clamp(|τ_t|, q(|τ_t|, ⌊0.01·d⌋), q(|τ_t|, ⌊0.99·d⌋ − 1)),  τ̂_t = sign(τ_t)·a_t
  n_t = minmax(a_t) ∈ [0, 1],  ŝ_t = sign(τ_t)·n_t
  β_t = exp(T·n_t²) ⊙ Σ_s tanh(ŝ_t ⊙ ŝ_s)                   (intra- times inter-balancing, s = t included)
  w_t = minmax(clamp(β_t, q(β_t, ⌊(1 − r)·d⌋), max β_t))      (0 below the top fraction r = 0.05)
  θ   = θ0 + Σ_t λ_t τ̂_t ⊙ w_t / max(Σ_t w_t, 1e-12)
λ_t = 1.2 for every task (`pcb.py`); pcb_ES searches λ_t ∈ [0.8, 1.3] on the …Val splits (NGOpt,
budget 100), which belongs with the search, not here. A constant row (max = min, e.g. a zero τ_t)
would divide by zero in minmax; here it normalises to 0.

After clamping, a_t's minimum and maximum are the two clamp bounds, so minmax needs no extra pass.
The quantiles are selections (numpy's introselect) instead of sorts, at the originals' exact indices:
|τ_t|'s in one d-sized buffer, task by task; β_t's from its r·d largest values, gathered while the
chunks stream past (≈ 2·r·d floats per task), so memory stays far below the original's T × d arrays
and β is computed twice instead of stored.
"""
from __future__ import annotations

from typing import Sequence

import torch

from taskmerge.merging.task_vectors import (CHUNK, Experts, StateDict, apply, as_float, chunks, float_dtype,
                                            merged_keys, numel_of, read_flat, shape_of, task_magnitudes,
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


class LargestValues:
    """The `count` largest values of a stream, holding about twice that many, not the stream."""

    def __init__(self, count: int):
        self.count, self.floor, self.parts, self.held = count, -float("inf"), [], 0

    def add(self, values: torch.Tensor) -> None:
        values = values[values >= self.floor]  # below the count-th largest seen so far: never needed
        self.parts.append(values)
        self.held += values.numel()
        if self.held >= 2 * self.count + CHUNK:
            self._shrink()

    def _shrink(self) -> None:
        pool = torch.cat(self.parts)
        if pool.numel() > self.count:
            self.floor = kth_smallest(pool, [pool.numel() - self.count])[0]
            pool = pool[pool.numel() - self.count:].clone()
        self.parts, self.held = [pool], pool.numel()

    def lowest_and_highest(self) -> list[float]:
        """[the count-th largest, the largest]."""
        self._shrink()
        return [float(self.parts[0].min()), float(self.parts[0].max())]


def stacked_chunks(pretrained: StateDict, finetuned: Experts, keys: list[str]):
    """(key, span, (T, c) task vectors) over every flat chunk of every key, in order."""
    for key in keys:
        for span in chunks(numel_of(pretrained, key)):
            theta0 = as_float(read_flat(pretrained, key, span))
            yield key, span, torch.stack(list(taus_at(theta0, finetuned, key, span)))


def pcb_delta(pretrained: StateDict, finetuned: Experts, ratio: float = RATIO,
              lams: float | Sequence[float] = LAM, validate_inputs: bool = True
              ) -> dict[str, torch.Tensor]:
    """Σ_t λ_t τ̂_t ⊙ w_t / max(Σ_t w_t, 1e-12) per key."""
    num_tasks = len(finetuned)
    lams = [float(lams)] * num_tasks if isinstance(lams, (int, float)) else [float(x) for x in lams]
    if len(lams) != num_tasks:
        raise ConfigError(f"lams has {len(lams)} values for {num_tasks} tasks: give one λ_t per task, "
                          f"or one λ")
    if not 0.0 < ratio <= 1.0:
        raise ConfigError(f"ratio={ratio}: the kept fraction r is in (0, 1] "
                          f"(the original's pcb_ratio: 0.05)")
    if validate_inputs:
        validate(pretrained, finetuned)
    keys = merged_keys(pretrained)
    bounds = magnitude_bounds(pretrained, finetuned, keys)
    dim = sum(numel_of(pretrained, key) for key in keys)
    count = dim - int(dim * (1 - ratio))  # q(β_t, ⌊(1 − r)·d⌋) is β_t's count-th largest
    if count < 1:
        raise ConfigError(f"ratio={ratio}: keeps no entry of the {dim} task-vector entries; "
                          f"use a larger r")
    largest = [LargestValues(count) for _ in range(num_tasks)]
    for _, _, taus in stacked_chunks(pretrained, finetuned, keys):
        for row, beta in zip(largest, balancing_score(taus, bounds)):
            row.add(beta)
    beta_bounds = torch.tensor([row.lowest_and_highest() for row in largest], dtype=bounds.dtype)
    del largest
    lam = torch.tensor(lams, dtype=bounds.dtype)[:, None]
    delta = {}
    for key, (start, stop), taus in stacked_chunks(pretrained, finetuned, keys):
        weights = minmax(balancing_score(taus, bounds), beta_bounds[:, :1], beta_bounds[:, 1:])
        if key not in delta:
            delta[key] = torch.empty(shape_of(pretrained, key), dtype=float_dtype(pretrained, key))
        delta[key].view(-1)[start:stop] = ((lam * clamped(taus, bounds) * weights).sum(0)
                                          / weights.sum(0).clamp(min=1e-12))
    return delta


def pcb_merging(pretrained: StateDict, finetuned: Experts, ratio: float = RATIO,
                lams: float | Sequence[float] = LAM, validate_inputs: bool = True
                ) -> dict[str, torch.Tensor]:
    """θ0 + PCB(τ_1..τ_T), λ_t = 1.2 by default (the original's fixed-λ script)."""
    return apply(pretrained, pcb_delta(pretrained, finetuned, ratio, lams, validate_inputs), consume=True)
