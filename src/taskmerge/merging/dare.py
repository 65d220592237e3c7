"""DARE, drop and rescale (METHODS_RECORDS.md §5; yule-BUAA/MergeLM, FusionBench `method/dare`), as a
preprocessing of the experts before Task Arithmetic or TIES.

  keep_t = [u ≥ p],  u ~ U[0, 1) per element;  τ̃_t = τ_t ⊙ keep_t / (1 − p)   (no division if rescale=False)
on every floating-point key (FusionBench's default `only_on_linear_weights: false`, and the original's
scope). `drop_and_rescale(θ0, experts, p)` returns lazy experts θ0 + τ̃_t that the base methods take
unchanged: DARE+TA is `task_arithmetic(θ0, drop_and_rescale(θ0, experts, p), lam)` (`dare_task_arithmetic`),
DARE+TIES likewise (`dare_ties`).

Seeded and reproducible (FusionBench draws from the unseeded global generator): the uniforms of
task t, key `key`, elements [i·DRAW_BLOCK, (i+1)·DRAW_BLOCK) come from a generator seeded with a hash
of (seed, t, key, i), so any span of a key reads the same mask whatever the order of reads, and the
masks are statistically, not bitwise, FusionBench's. `u ≥ p` keeps with probability exactly 1 − p on
torch's grid of uniforms (FusionBench's `u > p` would drop u = 0 even at p = 0). A base method
recomputes τ̃_t as θ̃_t − θ0: one float rounding of θ0 + τ̃_t, as in any stored fine-tuned weights;
a dropped entry is exactly θ0 (τ̃ = 0), and without a rescale (p = 0 or rescale=False) a kept one is
exactly θ_t.
"""
from __future__ import annotations

import hashlib
from typing import Iterator, Mapping

import torch

from taskmerge.merging.task_arithmetic import task_arithmetic
from taskmerge.merging.task_vectors import (Experts, StateDict, as_float, numel_of, read_flat, shape_of,
                                            source_name, validate)
from taskmerge.merging.ties import ties_merging
from taskmerge.storage.errors import ConfigError

DRAW_BLOCK = 1 << 16  # part of the mask's definition: changing it changes every mask
# config/method/dare/{task_arithmetic,ties_merging}.yaml; FusionBench runs no search
PRESETS = {"fusionbench_ta": {"p": 0.5, "rescale": True, "lam": 0.3},
           "fusionbench_ties": {"p": 0.5, "rescale": True, "lam": 0.5, "k": 0.2, "merge": "dis-sum"}}


def block_seed(seed: int, task: int, key: str, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}/{task}/{key}/{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def keep_mask(seed: int, task: int, key: str, start: int, stop: int, p: float) -> torch.Tensor:
    """keep_t = [u ≥ p] for flat elements [start, stop) of `key`."""
    first, last = start // DRAW_BLOCK, max(start, stop - 1) // DRAW_BLOCK
    draws = [torch.rand(DRAW_BLOCK, generator=torch.Generator().manual_seed(block_seed(seed, task, key, i)))
             for i in range(first, last + 1)]
    offset = first * DRAW_BLOCK
    return torch.cat(draws)[start - offset:stop - offset] >= p


class DroppedExpert(Mapping[str, torch.Tensor]):
    """θ0 + τ̃_t of one task, computed per key (or flat span) on access; non-float keys pass through."""

    def __init__(self, pretrained: StateDict, expert: StateDict, task: int, p: float, rescale: bool,
                 seed: int):
        self.pretrained, self.expert, self.task = pretrained, expert, task
        self.p, self.rescale, self.seed = p, rescale, seed
        self.path = f"{source_name(expert, f'task {task}')} (DARE p={p}, seed={seed})"

    def read_flat(self, key: str, start: int, stop: int) -> torch.Tensor:
        theta_t = read_flat(self.expert, key, (start, stop))
        if not theta_t.is_floating_point():
            return theta_t
        theta0 = read_flat(self.pretrained, key, (start, stop))
        keep = keep_mask(self.seed, self.task, key, start, stop, self.p)
        if self.p == 0.0 or not self.rescale:  # θ0 + 1·τ_t is θ_t: take it, without the round trip
            return torch.where(keep, theta_t, theta0)
        base = as_float(theta0)
        rescaled = base + (as_float(theta_t) - base) / (1.0 - self.p)
        return torch.where(keep, rescaled.to(theta_t.dtype), theta0)  # dropped: exactly θ0, τ̃ = 0

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.read_flat(key, 0, numel_of(self.expert, key)).reshape(shape_of(self.expert, key))

    def dtype(self, key: str) -> torch.dtype:
        return self.expert.dtype(key) if hasattr(self.expert, "dtype") else self.expert[key].dtype

    def shape(self, key: str) -> tuple[int, ...]:
        return shape_of(self.expert, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.expert.keys())

    def __len__(self) -> int:
        return len(self.expert)

    def __contains__(self, key) -> bool:
        return key in self.expert


def drop_and_rescale(pretrained: StateDict, finetuned: Experts, p: float = 0.5, rescale: bool = True,
                     seed: int = 0, validate_inputs: bool = True) -> dict[str, DroppedExpert]:
    """{task: θ0 + τ̃_t} as lazy experts, in task order; task t's masks depend on (seed, t, key)."""
    if not 0.0 <= p < 1.0:
        raise ConfigError(f"p={p}: the drop probability is in [0, 1) (FusionBench's default 0.5)")
    if validate_inputs:
        validate(pretrained, finetuned)
    return {task: DroppedExpert(pretrained, expert, t, p, rescale, seed)
            for t, (task, expert) in enumerate(finetuned.items())}


def dare_task_arithmetic(pretrained: StateDict, finetuned: Experts, p: float = 0.5, lam: float = 0.3,
                         rescale: bool = True, seed: int = 0) -> dict[str, torch.Tensor]:
    """θ0 + λ Σ_t τ̃_t (FusionBench's DARE+TA defaults)."""
    dropped = drop_and_rescale(pretrained, finetuned, p, rescale, seed)
    return task_arithmetic(pretrained, dropped, lam, validate_inputs=False)


def dare_ties(pretrained: StateDict, finetuned: Experts, p: float = 0.5, lam: float = 0.5, k: float = 0.2,
              merge: str = "dis-sum", rescale: bool = True, seed: int = 0,
              keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """θ0 + λ·TIES(τ̃_1..τ̃_T) (FusionBench's DARE+TIES defaults; `keys`: TIES's flattened keys,
    FusionBench's `DareTiesMerging` flattens its CLIPVisionModel's state dict as TIES does)."""
    dropped = drop_and_rescale(pretrained, finetuned, p, rescale, seed)
    return ties_merging(pretrained, dropped, k, merge, lam, validate_inputs=False, keys=keys)
