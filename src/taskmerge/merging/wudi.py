"""WUDI-Merging (METHODS_RECORDS.md §3; nathanielyvo/WUDI-Merging `vit/wudi_main.py`).

Per optimised key, with n_t = ‖τ_t‖²_F, the merged task vector X minimises
  L(X) = Σ_t ‖(X − τ_t) τ_tᵀ‖²_F / n_t = tr(X A Xᵀ) − 2 tr(X Bᵀ) + const,
  A = Σ_t τ_tᵀτ_t / n_t (in × in),  B = Σ_t τ_t τ_tᵀτ_t / n_t (out × in),  ∇L = 2 (X A − B).
solver="adam" (the original): Adam(lr=1e-5, β = (0.9, 0.999), ε = 1e-8) for 300 full-batch steps from
X₀ = Σ_t τ_t. A and B are precomputed once per key in float64, so a step costs one out × in × in
product instead of the literal loss's T products of out × in × out; the iterates equal the
original's up to rounding (see `adam`). solver="closed_form" (ours): the exact minimiser X* = B A⁺
(A's min-norm pseudo-inverse in float64, `torch.linalg.pinv`, which is B A⁻¹ when A is invertible;
`c_proj` with fewer than 4 tasks has a singular A; `ridge` > 0 solves with A + ε I instead). A task
with n_t = 0 on a key drops out of that key's objective (the literal loss is 0/0 = NaN there); a key
whose tasks are all zero merges to 0.

The original optimises only the block matrices (`in_proj`, `out_proj`, `c_fc`, `c_proj`) and leaves
every other key at θ0 (`others="pretrained"`); FusionBench optimises every 2-D key for 400 steps and
gives the other keys the mean of the task vectors (`PRESETS["fusionbench"]`). θ = θ0 + X, no scale.
The fused `attn.in_proj_weight` is one matrix in the original (open_clip); `qkv="separate"` solves
its q, k and v blocks as three objectives, as FusionBench's `method/wudi/wudi.py` does on its
CLIPVisionModel's q_proj, k_proj, v_proj (each with its own n_t).
"""
from __future__ import annotations

from typing import Iterable

import torch

from taskmerge.merging.task_vectors import (Experts, StateDict, apply, as_float, merged_keys, row_blocks,
                                            taus_at, validate)
from taskmerge.storage.errors import ConfigError

BLOCK_MATRICES = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
SOLVERS = ("adam", "closed_form")
PRESETS = {
    "original": {"solver": "adam", "steps": 300, "lr": 1e-5, "keys": "blocks", "others": "pretrained"},
    "fusionbench": {"solver": "adam", "steps": 400, "lr": 1e-5, "keys": "all_2d", "others": "mean"},
}


def is_optimised(key: str, ndim: int, keys: str) -> bool:
    if keys == "blocks":
        return any(name in key for name in BLOCK_MATRICES)
    return ndim == 2


def gram_terms(taus: Iterable[torch.Tensor]):
    """(A, B, X₀ = Σ τ_t) of one key in float64, one τ_t at a time; A and B are None when every
    task vector is zero."""
    a = b = tau_sum = None
    for tau in taus:
        tau_sum = tau.clone() if tau_sum is None else tau_sum.add_(tau)
        tau = tau.double()
        norm = float((tau * tau).sum())
        if norm == 0.0:
            continue
        gram = (tau.mT @ tau) / norm
        a = gram if a is None else a.add_(gram)
        b = tau @ gram if b is None else b.add_(tau @ gram)
    return a, b, tau_sum


def loss(x: torch.Tensor, taus: Iterable[torch.Tensor]) -> torch.Tensor:
    """The literal objective, Σ_t ‖(X − τ_t) τ_tᵀ‖²_F / ‖τ_t‖²_F (for checks, not for solving)."""
    return sum(((x - tau) @ tau.mT).square().sum() / tau.square().sum() for tau in taus)


def gradient(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 2 * (x @ a - b)


def closed_form(a: torch.Tensor, b: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """X* = B A⁺ (float64); with ridge > 0, B (A + ε I)⁻¹ with ε = ridge·tr(A)/in (tr A = T, so ε is
    relative to A's mean eigenvalue). A near-singular A (c_proj with T = 4, rank ≤ 4·out = in) gives
    the exact X* large components along its weakest directions; the ridge damps them."""
    if ridge == 0.0:
        return b @ torch.linalg.pinv(a, hermitian=True)
    eps = ridge * float(torch.trace(a)) / a.shape[0]
    return torch.linalg.solve(a + eps * torch.eye(a.shape[0], dtype=a.dtype), b.mT).mT


def adam(x0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, steps: int = 300, lr: float = 1e-5
         ) -> torch.Tensor:
    """`steps` full-batch steps of torch's Adam on L from x0 (float64 A and B), in x0's dtype.

    ∇L(X) = ∇L(X₀) + 2 (X − X₀) A: the first term, the tasks' cross terms Σ_{s≠t} τ_s G_t / n_t at
    X₀ = Σ τ, is formed in float64, since X A − B in float32 cancels most of its digits where the
    tasks are nearly orthogonal, and Adam, dividing by |∇L|, would turn that rounding into lr-sized
    steps (the literal loss has no such cancellation: it forms X − τ_t first)."""
    start_gradient = gradient(x0.double(), a, b).to(x0.dtype)
    a = a.to(x0.dtype)
    x = torch.nn.Parameter(x0.clone())
    optimiser = torch.optim.Adam([x], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    for _ in range(steps):
        x.grad = start_gradient + 2 * ((x.detach() - x0) @ a)
        optimiser.step()
    return x.detach()


def solve(terms, solver: str, steps: int, lr: float, ridge: float) -> torch.Tensor:
    """X of one matrix from its (A, B, X₀)."""
    a, b, tau_sum = terms
    if a is None:  # every τ_t is zero: no objective, X stays X₀ = 0
        return tau_sum
    if solver == "closed_form":
        return closed_form(a, b, ridge).to(tau_sum.dtype)
    return adam(tau_sum, a, b, steps, lr)


def wudi_delta(pretrained: StateDict, finetuned: Experts, solver: str = "adam", steps: int = 300,
               lr: float = 1e-5, keys: str = "blocks", others: str = "pretrained", ridge: float = 0.0,
               validate_inputs: bool = True, qkv: str = "fused") -> dict[str, torch.Tensor]:
    """The merged task vector X per optimised key (and the mean τ per other key if others="mean");
    keys left out stay at θ0 under `apply`. `qkv`: in_proj as one matrix or as q, k, v."""
    if solver not in SOLVERS:
        raise ConfigError(f"solver={solver!r}: expected one of {SOLVERS}")
    if keys not in ("blocks", "all_2d") or others not in ("pretrained", "mean"):
        raise ConfigError(f"keys={keys!r}, others={others!r}: expected keys in ('blocks', 'all_2d') and "
                          f"others in ('pretrained', 'mean')")
    if ridge < 0 or (ridge > 0 and solver != "closed_form"):
        raise ConfigError(f"ridge={ridge}: a ridge ≥ 0 applies to solver='closed_form' only")
    if steps < 0 or not lr > 0:
        raise ConfigError(f"steps={steps}, lr={lr}: Adam needs steps ≥ 0 and lr > 0 "
                          f"(the original: 300, 1e-5)")
    if validate_inputs:
        validate(pretrained, finetuned)
    delta = {}
    for key in merged_keys(pretrained):
        theta0 = as_float(pretrained[key])
        if is_optimised(key, theta0.ndim, keys):
            blocks = [solve(gram_terms(tau[rows] for tau in taus_at(theta0, finetuned, key)),
                            solver, steps, lr, ridge)
                      for rows in row_blocks(key, theta0.shape[0], qkv)]
            delta[key] = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
        elif others == "mean":
            taus = taus_at(theta0, finetuned, key)
            mean = next(taus)
            for tau in taus:
                mean += tau
            delta[key] = mean / len(finetuned)
    return delta


def wudi_merging(pretrained: StateDict, finetuned: Experts, solver: str = "adam", steps: int = 300,
                 lr: float = 1e-5, keys: str = "blocks", others: str = "pretrained", ridge: float = 0.0,
                 validate_inputs: bool = True, qkv: str = "fused") -> dict[str, torch.Tensor]:
    """θ0 + X. The original by default; `wudi_merging(θ0, experts, **PRESETS["fusionbench"])` for
    FusionBench's variant, `solver="closed_form"` for the exact minimiser of the same objective."""
    return apply(pretrained, wudi_delta(pretrained, finetuned, solver, steps, lr, keys, others, ridge,
                                        validate_inputs, qkv), consume=True)
