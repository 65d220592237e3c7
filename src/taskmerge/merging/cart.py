"""CART, "Revisiting Weight Averaging for Model Merging" (METHODS_RECORDS.md §4; JH-GEECS/CART
`src/merging.py`, merge type "static").

  θ_avg = θ0 + τ̄,  τ̄ = (1/T) Σ_t τ_t                                   on every key
  c_t   = τ_t − τ̄ = U diag(s) Vᵀ,  k = max(1, ⌊ρ·min(m, n)⌋),  LR_k(c_t) = U_k diag(s_k) V_kᵀ
  θ     = θ_avg + λ Σ_t LR_k(c_t)                                        on the block matrices
A block matrix is a key whose name has "attn" or "mlp" and neither "ln" nor "bias" (the original's
rule; on open_clip exactly `in_proj`, `out_proj`, `c_fc`, `c_proj` of each residual block, the fused
`in_proj` as one matrix). Every other key is θ_avg: the original adds λ·Σ_t c_t there, which is zero
but for rounding, so weight averaging is the exact value. ρ = 0 gives k = 0 and ρ = 1 keeps c_t whole
(the original's two special cases): CART is weight averaging for any λ at both ends.

There is no search: the repository's configs fix λ (`prior`) and ρ (`initial_rank_ratio`) per
number of tasks, ViT-B/32 only (`PRESETS`). The truncated SVDs are TSV-M's (`tsv.leading_triplets`).
"""
from __future__ import annotations

import torch

from taskmerge.merging.task_vectors import Experts, StateDict, apply, as_float, merged_keys, taus_at, validate
from taskmerge.merging.tsv import leading_triplets
from taskmerge.storage.errors import ConfigError

# configs/CART/ViT-b-32_{8,14,20}_CART.yaml
PRESETS = {8: {"lam": 2.0, "rank_ratio": 0.12},
           14: {"lam": 1.5, "rank_ratio": 0.16},
           20: {"lam": 1.9, "rank_ratio": 0.32}}


def is_block_matrix(key: str) -> bool:
    return ("attn" in key or "mlp" in key) and "ln" not in key and "bias" not in key


def rank_of(shape: tuple[int, int], rank_ratio: float) -> int:
    """k = max(1, ⌊ρ·min(m, n)⌋), and 0 for ρ = 0."""
    return 0 if rank_ratio == 0 else max(1, int(rank_ratio * min(shape)))


def low_rank_residuals(tau_bar: torch.Tensor, taus, k: int) -> torch.Tensor:
    """Σ_t LR_k(τ_t − τ̄), one task at a time."""
    total = torch.zeros_like(tau_bar)
    for tau in taus:
        centred = tau.sub_(tau_bar)
        if k >= min(centred.shape):
            total += centred
        elif k > 0 and centred.any():
            u, s, vh = leading_triplets(centred, k)
            total += (u * s) @ vh
    return total


def cart_delta(pretrained: StateDict, finetuned: Experts, lam: float = 2.0, rank_ratio: float = 0.12,
               validate_inputs: bool = True) -> dict[str, torch.Tensor]:
    """θ − θ0 per key: τ̄, plus λ Σ_t LR_k(c_t) on the block matrices."""
    if not 0.0 <= rank_ratio <= 1.0:
        raise ConfigError(f"rank_ratio={rank_ratio}: ρ is a fraction of min(m, n) in [0, 1] "
                          f"(the 8-task preset: 0.12)")
    if validate_inputs:
        validate(pretrained, finetuned)
    inverse_t = 1.0 / len(finetuned)
    delta = {}
    for key in merged_keys(pretrained):
        theta0 = as_float(pretrained[key])
        taus = taus_at(theta0, finetuned, key)
        tau_bar = next(taus)
        for tau in taus:
            tau_bar += tau
        tau_bar.mul_(inverse_t)  # rounds as weight_averaging's (Σ τ)·(1/T)
        if theta0.ndim == 2 and is_block_matrix(key):
            residuals = low_rank_residuals(tau_bar, taus_at(theta0, finetuned, key),
                                           rank_of(theta0.shape, rank_ratio))
            tau_bar += lam * residuals
        delta[key] = tau_bar
    return delta


def cart_merging(pretrained: StateDict, finetuned: Experts, lam: float = 2.0, rank_ratio: float = 0.12,
                 validate_inputs: bool = True) -> dict[str, torch.Tensor]:
    """θ_avg + λ Σ_t LR_k(τ_t − τ̄); defaults are the 8-task preset, `**PRESETS[T]` for 14 or 20."""
    return apply(pretrained, cart_delta(pretrained, finetuned, lam, rank_ratio, validate_inputs),
                 consume=True)
