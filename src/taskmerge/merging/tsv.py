"""TSV-Merge (METHODS.md §2.11, A.6): `method=TSVM` and its eigendecomposition variant `TSVM_2`.

For a 2-D key (m × n, r = min(m, n)), every task keeps its k = r // T leading singular triplets
Δ_t ≈ U_t S_t V_tᵀ. TSV-M concatenates them into U_cat (m × r, task t in columns [t·k, (t+1)·k),
zero tail when T·k < r), S_cat (r) and V_cat (r × n) and removes the interference between tasks:
  TSVM:   U⊥ = P_u Q_uᵀ from U_cat = P_u Σ_u Q_uᵀ (the polar factor), V⊥ likewise;
          Δ = U⊥ diag(S_cat) V⊥
  TSVM_2: sort S_cat ascending (stable) with U_cat's columns and V_cat's rows, then
          Δ = U_cat (U_catᵀU_cat)^-1/2 diag(S_cat) (V_cat V_catᵀ)^-1/2 V_cat,
          inverse square roots by eigh with eigenvalues λ → 1/(√|λ| + 1e-12)
Keys that are not 2-D, and TSV-M's `text_projection`, take the plain mean of the task vectors.
θ = θ0 + α·Δ. TSV-C, which keeps each task's own factors instead, is in tsv_compress.py. The fused
`attn.in_proj_weight` is one matrix (the original, on open_clip); `qkv="separate"` merges its q, k
and v blocks apart, as FusionBench's TSVM (`task_singular_vector/utils/TSVM_utils.py`
`compute_and_sum_svd_mem_reduction`, every 2-D key of its CLIPVisionModel) does.

Singular triplets are computed one task at a time, from each τ_t's float64 Gram (exact to float64
rounding, more accurate than the originals' float32 SVD): CPU LAPACK loops over a batch anyway (a
stacked (T, m, n) call measured no faster), and this way memory stays at one matrix plus r·(m + n)
factors whatever T is. A key whose task vectors are all exactly zero (the text-side leftovers)
merges to zero, as S_cat = 0 makes it in the originals, without computing its SVDs; so does a key
with k = 0 (more tasks than r).
"""
from __future__ import annotations

from typing import Iterable

import torch

from taskmerge.merging.task_vectors import (Experts, StateDict, apply, as_float, merged_keys, row_blocks,
                                            taus_at, validate)

METHODS = ("TSVM", "TSVM_2")


def leading_triplets(tau: torch.Tensor, k: int, exact_svd: bool = False):
    """The k leading singular triplets (U_k, S_k, V_kᵀ) of a 2-D `tau`, as a thin SVD gives them.

    `exact_svd=True` always takes torch's float32 SVD, whose rounding TSVM_2's ill-conditioned
    whitening (1e12 factors on zero-padded columns) amplifies: that variant reproduces the
    original's arithmetic rather than the exact math."""
    m, n = tau.shape
    if m < n and not exact_svd:  # LAPACK's SVD of a wide matrix: 2× slower than of its transpose
        u, s, vh = leading_triplets(tau.mT, k, exact_svd)
        return vh.mT, s, u.mT
    if 0 < k <= n // 2 and not exact_svd:
        found = _leading_by_gram(tau, k)
        if found is not None:
            return found
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    return u[:, :k], s[:k], vh[:k, :]


def _leading_by_gram(tau: torch.Tensor, k: int):
    """Top-k triplets of a tall `tau` from the k largest eigenpairs of τᵀτ, in float64.

    On a 3072 × 768 matrix the float64 Gram and its eigendecomposition (torch's, MKL's divide and
    conquer) took 0.085 s against 0.18 s for the float32 SVD (2 threads), and are more accurate
    for the kept triplets (the Gram's float64 rounding, ~1e-16·σ₁², is far below float32's
    ~1e-7·σ₁). SciPy's partial `dsyevr` computes only the k wanted eigenvectors but measured
    slower here (0.13 s with the Gram), as its BLAS threads do not help at this size. Returns None
    — use the SVD — when a kept singular value is within 1e-5·σ₁ of zero: there the singular
    vectors are arbitrary and the SVD's own choice is the one to reproduce."""
    a = tau.double()
    eigvals, eigvecs = torch.linalg.eigh(a.mT @ a)  # ascending
    eigvals, eigvecs = eigvals[-k:].flip(0), eigvecs[:, -k:].flip(1)  # descending, as the SVD
    if not eigvals[-1] > 1e-10 * eigvals[0]:
        return None
    s = eigvals.sqrt()
    u = (a @ eigvecs) / s
    return u.to(tau.dtype), s.to(tau.dtype), eigvecs.mT.to(tau.dtype)


def _inverse_sqrt(gram: torch.Tensor) -> torch.Tensor:
    eigvals, eigvecs = torch.linalg.eigh(gram)
    return eigvecs @ torch.diag(1.0 / (torch.sqrt(torch.abs(eigvals)) + 1e-12)) @ eigvecs.mT


def polar_factor(x: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor P Qᵀ of x = P Σ Qᵀ (tall or wide; x must have full rank).

    Computed as x (xᵀx)^-1/2 from the float64 Gram's eigendecomposition: 1.4× faster than the
    float32 SVD on the 3072 × 768 factors and ~100× closer to the exact value, since U_cat's
    columns are close to orthonormal (each task's block is). Rounding grows with the condition
    number squared, so a factor with κ > 1e4 (tasks sharing a direction) goes through the SVD."""
    if x.shape[0] < x.shape[1]:  # the polar factor of xᵀ is the transpose
        return polar_factor(x.mT).mT
    a = x.double()
    eigvals, eigvecs = torch.linalg.eigh(a.mT @ a)
    if not eigvals[0] > 1e-8 * eigvals[-1]:
        p, _, qh = torch.linalg.svd(x, full_matrices=False)
        return p @ qh
    return (a @ ((eigvecs / eigvals.sqrt()) @ eigvecs.mT)).to(x.dtype)


def tsv_merge_key(taus: Iterable[torch.Tensor], num_tasks: int, method: str = "TSVM",
                  device: str | torch.device | None = None) -> torch.Tensor:
    """The TSV-M delta of one 2-D key from its T task vectors (streamed, one at a time). With
    `device` (e.g. "cuda") the decompositions run there, one key at a time, as the TSV original
    does on its GPU; the delta comes back to the CPU."""
    if device is not None:
        return _tsv_merge_key((tau.to(device) for tau in taus), num_tasks, method).cpu()
    return _tsv_merge_key(taus, num_tasks, method)


def _tsv_merge_key(taus: Iterable[torch.Tensor], num_tasks: int, method: str) -> torch.Tensor:
    u_cat = s_cat = v_cat = None
    exact = method == "TSVM_2"
    zero_tasks = []  # all-zero τ_t: SVD deferred, skipped entirely if every task is zero
    for t, tau in enumerate(taus):
        if u_cat is None:
            m, n = tau.shape
            r = min(m, n)
            k = r // num_tasks
            u_cat, s_cat, v_cat = tau.new_zeros(m, r), tau.new_zeros(r), tau.new_zeros(r, n)
        if not tau.any() or k == 0:
            zero_tasks.append(t)
            continue
        block = slice(t * k, (t + 1) * k)
        u_cat[:, block], s_cat[block], v_cat[block, :] = leading_triplets(tau, k, exact)
    if len(zero_tasks) == num_tasks:
        return u_cat.new_zeros(m, n)
    for t in zero_tasks:  # the originals' U/V of a zero matrix still shape the polar factors
        block = slice(t * k, (t + 1) * k)
        u_cat[:, block], s_cat[block], v_cat[block, :] = leading_triplets(u_cat.new_zeros(m, n), k)
    if method == "TSVM":
        # When T·k < r the tail columns of U_cat (rows of V_cat) are zero and so is S_cat there:
        # the polar factor of [U, 0] is [polar(U), any completion], which S_cat's zeros cancel.
        used = slice(0, num_tasks * k)
        return torch.linalg.multi_dot((polar_factor(u_cat[:, used]), torch.diag(s_cat[used]),
                                       polar_factor(v_cat[used, :])))
    s_cat, order = torch.sort(s_cat, stable=True)
    u_cat, v_cat = u_cat[:, order], v_cat[order, :]
    return torch.linalg.multi_dot((u_cat, _inverse_sqrt(u_cat.mT @ u_cat), torch.diag(s_cat),
                                   _inverse_sqrt(v_cat @ v_cat.mT), v_cat))


def tsv_delta(pretrained: StateDict, finetuned: Experts, method: str = "TSVM",
              validate_inputs: bool = True, device: str | torch.device | None = None,
              qkv: str = "fused") -> dict[str, torch.Tensor]:
    """The unscaled TSV-M task vector, key by key (the 2-D keys' decompositions on `device`;
    `qkv`: in_proj as one matrix or as q, k, v)."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {METHODS}")
    if validate_inputs:
        validate(pretrained, finetuned)
    merged = {}
    for key in merged_keys(pretrained):
        theta0 = as_float(pretrained[key])
        if theta0.ndim == 2 and "text_projection" not in key:
            blocks = [tsv_merge_key((tau[rows] for tau in taus_at(theta0, finetuned, key)),
                                    len(finetuned), method, device)
                      for rows in row_blocks(key, theta0.shape[0], qkv)]
            merged[key] = torch.cat(blocks) if len(blocks) > 1 else blocks[0]
            continue
        taus = taus_at(theta0, finetuned, key)
        mean = next(taus)
        for i, tau in enumerate(taus, start=2):  # the originals' running mean
            mean += (tau - mean) / i
        merged[key] = mean
    return merged


def tsv_merging(pretrained: StateDict, finetuned: Experts, alpha: float = 1.0,
                method: str = "TSVM", validate_inputs: bool = True,
                device: str | torch.device | None = None, qkv: str = "fused") -> dict[str, torch.Tensor]:
    """θ0 + α·TSV-M. α = 1 is FusionBench's default; the originals pick α from `ALPHA_GRID`
    = {0.1, …, 3.0} on the …Val splits (selection.py). `device`: where the SVDs run."""
    return apply(pretrained, tsv_delta(pretrained, finetuned, method, validate_inputs, device, qkv), alpha,
                 consume=True)


ALPHA_GRID = [i / 10 for i in range(1, 31)]
