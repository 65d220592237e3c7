"""Fisher merging (Matena & Raffel 2022), as FusionBench runs it for CLIP: per entry
θ = Σ_t c_t (F_t + ε) θ_t / Σ_t c_t (F_t + ε), F_t the diagonal Fisher of expert t.

FusionBench (fusion_bench/method/fisher_merging/fisher_merging.py `merging_with_fisher_weights`,
L110-189, called at L443-451): ε = `minimal_fisher_weight` (1e-6) is added to every Fisher entry;
with `normalize_fisher_weight` each model's weight is c_t ∝ 1 / (‖F_t‖ + ε), ‖F_t‖ the global L2
norm of its Fisher over every merged entry (taken before ε is added, `get_models_fisher_norm`
L68-107), else c_t = 1; its uniform `fisher_scaling_coefficients` (1/n, L446) and the normalisation
of the c_t to sum 1 multiply every term of numerator and denominator alike and cancel.

Because c_t needs only F_t itself, the merge is accumulated expert by expert (`FisherAccumulator`):
Σ_t c_t (F_t + ε) θ_t and Σ_t c_t (F_t + ε), two model-sized sums whatever the number of tasks. A key
outside the merged set keeps θ0 (FusionBench never sees the keys its CLIPVisionModel lacks).
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch

from taskmerge.merging.task_vectors import StateDict, as_float, merged_keys

DEFAULT_MINIMAL_WEIGHT = 1e-6


def fisher_norm(fisher: Mapping[str, torch.Tensor], keys: Iterable[str]) -> float:
    """‖F‖: the L2 norm over every entry of `keys` (FusionBench's norm of the per-key norms)."""
    return float(torch.stack([fisher[k].double().norm() for k in keys]).norm())


class FisherAccumulator:
    """Σ_t c_t (F_t + ε) θ_t and Σ_t c_t (F_t + ε) over the keys merged, one expert at a time."""

    def __init__(self, pretrained: StateDict, keys: Iterable[str] | None = None, *,
                 minimal_weight: float = DEFAULT_MINIMAL_WEIGHT, normalize: bool = True):
        self.pretrained = pretrained
        self.keys = list(keys) if keys is not None else merged_keys(pretrained)
        self.minimal_weight, self.normalize = minimal_weight, normalize
        self.numerator: dict[str, torch.Tensor] = {}
        self.denominator: dict[str, torch.Tensor] = {}
        self.count = 0
        self.weights: list[float] = []

    def add(self, expert: StateDict, fisher: Mapping[str, torch.Tensor]) -> float:
        """Add one expert and its diagonal Fisher (a tensor per merged key); returns its c_t."""
        missing = [k for k in self.keys if k not in fisher]
        if missing:
            raise ValueError(f"the Fisher has no entry for {len(missing)} merged keys, e.g. {missing[:3]}")
        c = 1.0 / (fisher_norm(fisher, self.keys) + self.minimal_weight) if self.normalize else 1.0
        for k in self.keys:
            f = as_float(fisher[k]).add(self.minimal_weight).mul_(c)
            theta = as_float(expert[k])
            if k in self.numerator:
                self.numerator[k].addcmul_(f, theta)
                self.denominator[k].add_(f)
            else:
                self.numerator[k] = f * theta
                self.denominator[k] = f
        self.count += 1
        self.weights.append(c)
        return c

    def merged(self) -> dict[str, torch.Tensor]:
        """θ: the Fisher-weighted mean on the merged keys, θ0 elsewhere, in θ0's dtypes."""
        if not self.count:
            raise ValueError("no expert was added")
        wanted = set(self.keys)
        out = {}
        for k in self.pretrained.keys():
            theta0 = self.pretrained[k]
            if k in wanted:
                out[k] = (self.numerator[k] / self.denominator[k]).to(theta0.dtype)
            else:
                out[k] = theta0.clone()
        return out


def fisher_merging(pretrained: StateDict, experts: Mapping[str, StateDict],
                   fishers: Mapping[str, Mapping[str, torch.Tensor]], keys: Iterable[str] | None = None,
                   *, minimal_weight: float = DEFAULT_MINIMAL_WEIGHT, normalize: bool = True
                   ) -> dict[str, torch.Tensor]:
    """The merge from given Fishers ({task: {key: F}}), for tests and notebooks; a run computes and
    adds one expert's Fisher at a time (runs/methods/fisher_merging.py)."""
    acc = FisherAccumulator(pretrained, keys, minimal_weight=minimal_weight, normalize=normalize)
    for task, expert in experts.items():
        acc.add(expert, fishers[task])
    return acc.merged()
