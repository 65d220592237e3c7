"""Iso-C and Iso-CTS, isotropic merging (METHODS_RECORDS.md §1–2; danielm1405/iso-merging).

For a 2-D key (m × n, r = min(m, n)) other than `text_projection`, with M = Σ_t τ_t = U diag(σ) Vᵀ:
  Iso-C:   Δ = σ̄ · U Vᵀ,  σ̄ = mean(σ)                     (every singular value flattened to the mean)
  Iso-CTS: c₀ = ⌊r·f⌋, c = r − T·round((r − c₀)/T) (Python's half-to-even), k = (r − c)/T;
           common space U_c = U[:, :c]; task residuals R_t = τ_t − U_c U_cᵀ τ_t = P_t diag(ρ_t) Q_tᵀ;
           U_cat = [P_1,k … P_T,k | U_c], V_cat = [Q_1,kᵀ; …; Q_T,kᵀ; V_cᵀ], s_cat = [ρ_1,k … ρ_T,k | σ_c];
           Δ = mean(s_cat) · polar(U_cat) · polar(V_cat)
Other keys (not 2-D, and `text_projection`) take the plain mean of the task vectors. θ = θ0 + α·Δ, α
chosen on the …Val splits from `ALPHA_GRID` (the same grid as TSV-M; the early stopping and selection
rules live with the search). The fused `attn.in_proj_weight` is one matrix, as in the original;
`qkv="separate"` merges its q, k and v blocks as three matrices, as FusionBench does on its
CLIPVisionModel's q_proj, k_proj, v_proj (`method/isotropic_merging/iso_utils.py`: every 2-D key).

The SVDs are TSV-M's helpers (tsv.py): `leading_triplets` (the wide-matrix transpose, the float64
Gram for few triplets) and its polar factor. A key whose task vectors are all exactly zero (the text
leftovers, the 49408 × 512 token embedding among them) merges to zero without an SVD: σ = 0 there,
so the original's Δ is exactly zero too. Iso-CTS with k = 0 (more tasks than r − c₀ rounds to) is
Iso-C for that key, as U_c is already orthonormal; it is computed as Iso-C.
"""
from __future__ import annotations

from typing import Callable, Iterator

import torch

from taskmerge.merging.task_vectors import (Experts, StateDict, apply, as_float, merged_keys, row_blocks,
                                            taus_at, validate)
from taskmerge.merging.tsv import polar_factor, leading_triplets
from taskmerge.storage.errors import ConfigError

METHODS = ("iso_c", "iso_cts")
COMMON_SPACE_FRACTION = 0.8  # config/method/iso_cts.yaml
ALPHA_GRID = [i / 10 for i in range(1, 31)]  # linspace(0, 3, 31)[1:], src/eval/eval.py
EARLY_STOPPING_PATIENCE = 3  # config/config.yaml: the α sweep stops after 3 values without a gain


def subspace_sizes(r: int, num_tasks: int, fraction: float = COMMON_SPACE_FRACTION) -> tuple[int, int]:
    """(c, k): the common-space size and the per-task size, c + T·k = r (the original's rounding)."""
    shared = num_tasks * round((r - int(r * fraction)) / num_tasks)
    if shared > r:
        raise ConfigError(f"fraction={fraction}: with r={r} and {num_tasks} tasks the task subspaces "
                          f"({shared}) exceed r; use a larger common-space fraction")
    return r - shared, shared // num_tasks


def iso_c_key(tau_sum: torch.Tensor) -> torch.Tensor:
    """σ̄ · U Vᵀ of the summed task matrix."""
    u, sigma, vh = leading_triplets(tau_sum, min(tau_sum.shape))
    return sigma.mean() * (u @ vh)


def iso_cts_key(task_taus: Callable[[], Iterator[torch.Tensor]], num_tasks: int, tau_sum: torch.Tensor,
                fraction: float = COMMON_SPACE_FRACTION) -> torch.Tensor:
    """Iso-CTS's Δ of one matrix; `task_taus()` reads each task's τ again for its residual (moved to
    tau_sum's device)."""
    c, k = subspace_sizes(min(tau_sum.shape), num_tasks, fraction)
    if k == 0:
        return iso_c_key(tau_sum)
    u, sigma, vh = leading_triplets(tau_sum, c)
    blocks_u, blocks_s, blocks_v = [], [], []
    for tau in task_taus():
        tau = tau.to(tau_sum.device)
        residual = tau - u @ (u.mT @ tau)  # only the common column space is projected out
        p, rho, qh = leading_triplets(residual, k)
        blocks_u.append(p)
        blocks_s.append(rho)
        blocks_v.append(qh)
    u_cat = torch.cat(blocks_u + [u], dim=1)
    s_cat = torch.cat(blocks_s + [sigma])
    v_cat = torch.cat(blocks_v + [vh], dim=0)
    return s_cat.mean() * (polar_factor(u_cat) @ polar_factor(v_cat))


def iso_delta(pretrained: StateDict, finetuned: Experts, method: str = "iso_c",
              fraction: float = COMMON_SPACE_FRACTION, validate_inputs: bool = True,
              device: str | torch.device | None = None, qkv: str = "fused") -> dict[str, torch.Tensor]:
    """The unscaled Iso-C / Iso-CTS task vector, key by key (θ = θ0 + α·Δ with `apply`). With
    `device` (e.g. "cuda") each 2-D key's decompositions run there, one key at a time; Δ is on the CPU.
    `qkv`: "fused" (the original) or "separate" (FusionBench's three q/k/v matrices)."""
    on_device = device is not None
    if method not in METHODS:
        raise ConfigError(f"method={method!r}: expected one of {METHODS}")
    if not 0.0 <= fraction <= 1.0:
        raise ConfigError(f"fraction={fraction}: the common-space fraction is in [0, 1] "
                          f"(0.8 in the original)")
    if validate_inputs:
        validate(pretrained, finetuned)
    delta = {}
    for key in merged_keys(pretrained):
        taus = taus_at(as_float(pretrained[key]), finetuned, key)
        tau_sum = next(taus)
        if tau_sum.ndim == 2 and "text_projection" not in key:
            all_zero = not tau_sum.any()
            for tau in taus:
                all_zero = all_zero and not tau.any()
                tau_sum += tau
            if all_zero:
                delta[key] = tau_sum
            else:
                src = tau_sum.to(device) if on_device else tau_sum
                blocks = []
                for rows in row_blocks(key, src.shape[0], qkv):
                    if method == "iso_c":
                        blocks.append(iso_c_key(src[rows]))
                        continue
                    task_taus = (lambda rows=rows: (tau[rows] for tau in
                                                    taus_at(as_float(pretrained[key]), finetuned, key)))
                    blocks.append(iso_cts_key(task_taus, len(finetuned), src[rows], fraction))
                out = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
                delta[key] = out.cpu() if on_device else out
            continue
        for i, tau in enumerate(taus, start=2):  # the original's running mean
            tau_sum += (tau - tau_sum) / i
        delta[key] = tau_sum
    return delta


def iso_merging(pretrained: StateDict, finetuned: Experts, alpha: float = 1.0, method: str = "iso_c",
                fraction: float = COMMON_SPACE_FRACTION, validate_inputs: bool = True,
                device: str | torch.device | None = None, qkv: str = "fused") -> dict[str, torch.Tensor]:
    """θ0 + α·Iso(τ_1..τ_T). The original picks α from `ALPHA_GRID` on the …Val splits;
    FusionBench fixes α (1.0 in its yaml, 1.5 in its docs and published row). `device`: where the
    SVDs run."""
    return apply(pretrained, iso_delta(pretrained, finetuned, method, fraction, validate_inputs, device,
                                       qkv), alpha, consume=True)
