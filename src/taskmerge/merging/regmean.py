"""RegMean (Jin et al., ICLR 2023): every linear map of the merged model is the least-squares fit of
the experts' maps on their own inputs, W = argmin Σ_t ‖X_t Wᵀ − X_t W_tᵀ‖², i.e.

    Wᵀ = (Σ_t G̃_t)⁻¹ Σ_t G̃_t W_tᵀ,   G_t = X_tᵀ X_t / rows,   G̃ = α G + (1 − α) diag(G),

with α = `reduce_non_diagonal_ratio` (FusionBench `clip_regmean.yaml`: 0.95); every other entry is
the experts' plain mean. As FusionBench (fusion_bench/method/regmean/regmean.py
`merging_with_regmean_weights` L43-120, `reduce_non_diagonal_elements` L24-40), except that the
system is solved (Cholesky, float64) instead of multiplied by `torch.inverse`: the same W up to
rounding, and a singular Σ G̃ is named instead of giving inf or garbage.

A linear map is named by its weight key; `LinearMap.transposed` marks a weight stored (in, out), as
open_clip's `visual.proj` (y = x @ proj), where every other is (out, in) (y = x Wᵀ). The fused
attention `in_proj_weight` (3d × d) is one map: q, k and v read the same input, so their Grams are
one Gram, and solving the fused rows at once is solving each block of rows (FusionBench's separate
q_proj, k_proj, v_proj with three identical Grams) at once.

`RegMeanAccumulator` adds one expert (its weights and its Grams) at a time: Σ G̃ per map and
Σ G̃ Wᵀ, never T Grams.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from taskmerge.merging.task_vectors import StateDict, as_float, merged_keys

DEFAULT_RATIO = 0.95


@dataclass(frozen=True)
class LinearMap:
    """A linear map of the model: its weight key, the Gram of its inputs, the bias key if any."""
    weight: str
    gram: str
    bias: str | None = None
    transposed: bool = False   # weight stored (in, out)


class SingularGramError(ValueError):
    """Σ_t G̃_t of a linear map is singular (its inputs span fewer dimensions than it has)."""


def reduce_non_diagonal(gram: torch.Tensor, ratio: float) -> torch.Tensor:
    """G̃ = ratio · G off the diagonal, G on it (FusionBench regmean.py L24-40)."""
    out = gram * ratio
    out.diagonal().copy_(gram.diagonal())
    return out


def solve_regmean(gram_sum: torch.Tensor, rhs: torch.Tensor, name: str, ridge: float = 0.0) -> torch.Tensor:
    """(Σ G̃)⁻¹ Σ G̃ Wᵀ by a Cholesky factorisation in float64, with `ridge`·I added to Σ G̃ when
    asked. A sum of Grams is symmetric positive semi-definite; one whose smallest pivot is below
    float32's resolution of its largest (d · 2⁻²³ of it) is singular for inputs computed in float32,
    and is one error instead of a merge that amplifies rounding noise."""
    a = gram_sum.double()
    d = a.shape[0]
    if ridge:
        a = a + ridge * torch.eye(d, dtype=a.dtype, device=a.device)
    factor, info = torch.linalg.cholesky_ex(a)
    pivots = factor.diagonal() ** 2
    if int(info) != 0 or not torch.isfinite(pivots).all() or pivots.min() <= d * 2.0 ** -23 * pivots.max():
        raise SingularGramError(
            f"RegMean: the summed Gram of {name} ({d}×{d}) is singular: its inputs span too few "
            f"dimensions (too few examples, or a dead feature). Set reduce_non_diagonal_ratio below 1 "
            f"(FusionBench's 0.95 keeps the diagonal, which guards this), or set regmean_ridge > 0 "
            f"(e.g. 1e-4) to add ridge·I")
    return torch.cholesky_solve(rhs.double(), factor).to(rhs.dtype)


class RegMeanAccumulator:
    """RegMean over the linear maps `maps`, the plain mean over every other merged key."""

    def __init__(self, pretrained: StateDict, maps: Iterable[LinearMap], keys: Iterable[str] | None = None,
                 *, ratio: float = DEFAULT_RATIO, ridge: float = 0.0):
        self.pretrained = pretrained
        self.maps = {m.weight: m for m in maps}
        self.keys = list(keys) if keys is not None else merged_keys(pretrained)
        unknown = sorted(set(self.maps) - set(self.keys))
        if unknown:
            raise ValueError(f"linear maps {unknown[:3]} are not merged keys")
        self.ratio, self.ridge = ratio, ridge
        self.gram_sums: dict[str, torch.Tensor] = {}
        self.rhs: dict[str, torch.Tensor] = {}
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, expert: StateDict, grams: Mapping[str, torch.Tensor]) -> None:
        """One expert: its weights, and the Gram of each map's inputs on its own data."""
        needed = {m.gram for m in self.maps.values()}
        missing = sorted(needed - set(grams))
        if missing:
            raise ValueError(f"no Gram for {missing[:3]}")
        reduced = {name: reduce_non_diagonal(as_float(grams[name]), self.ratio) for name in needed}
        for name, g in reduced.items():
            if name in self.gram_sums:
                self.gram_sums[name].add_(g)
            else:
                self.gram_sums[name] = g.clone()
        for k in self.keys:
            w = as_float(expert[k])
            m = self.maps.get(k)
            if m is not None:
                wt = w if m.transposed else w.t()
                term = reduced[m.gram] @ wt.to(reduced[m.gram].dtype)
                if k in self.rhs:
                    self.rhs[k].add_(term)
                else:
                    self.rhs[k] = term
            elif k in self.sums:
                self.sums[k].add_(w)
            else:
                self.sums[k] = w.clone()
        self.count += 1

    def merged(self, only_merged: bool = False) -> dict[str, torch.Tensor]:
        """θ: RegMean's maps, the mean elsewhere on the merged keys, θ0 on the rest (left out with
        `only_merged`, for a merge block by block)."""
        if not self.count:
            raise ValueError("no expert was added")
        wanted = set(self.keys)
        out = {}
        for k in (self.keys if only_merged else self.pretrained.keys()):
            theta0 = self.pretrained[k]
            m = self.maps.get(k)
            if m is not None:
                wt = solve_regmean(self.gram_sums[m.gram], self.rhs[k], k, self.ridge)
                out[k] = (wt if m.transposed else wt.t()).contiguous().to(theta0.dtype)
            elif k in wanted:
                out[k] = (self.sums[k] / self.count).to(theta0.dtype)
            else:
                out[k] = theta0.clone()
        return out


def regmean_merging(pretrained: StateDict, experts: Mapping[str, StateDict],
                    grams: Mapping[str, Mapping[str, torch.Tensor]], maps: Iterable[LinearMap],
                    keys: Iterable[str] | None = None, *, ratio: float = DEFAULT_RATIO,
                    ridge: float = 0.0) -> dict[str, torch.Tensor]:
    """The merge from given Grams ({task: {gram name: G}}), for tests and notebooks; a run adds one
    expert's Grams at a time (runs/methods/regmean.py)."""
    acc = RegMeanAccumulator(pretrained, maps, keys, ratio=ratio, ridge=ridge)
    for task, expert in experts.items():
        acc.add(expert, grams[task])
    return acc.merged()
