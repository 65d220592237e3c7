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
θ = θ0 + α·Δ. TSV-C, which keeps each task's own factors instead, is in tsv_compress.py.

Singular triplets are exact thin SVDs, computed one task at a time: CPU LAPACK loops over a batch
anyway (a stacked (T, m, n) call measured no faster), and this way memory stays at one matrix plus
r·(m + n) factors whatever T is. A key whose task vectors are all exactly zero (the text-side
leftovers) merges to zero, as S_cat = 0 makes it in the originals, without computing its SVDs.
"""
from __future__ import annotations

from typing import Iterable

import torch

from ..task_vectors import Experts, StateDict, apply, as_float, merged_keys, taus_at, validate

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

    TSV keeps only r/T triplets, and LAPACK's relatively robust representations (dsyevr) compute
    just those eigenvectors: on a 3072 × 768 matrix the float64 Gram plus its top 96 eigenpairs
    took 0.18 s against 0.39 s for the float32 SVD, and more accurately for the kept triplets (the
    Gram's float64 rounding, ~1e-16·σ₁², is far below float32's ~1e-7·σ₁). Returns None — use the
    SVD — when a kept singular value is within 1e-5·σ₁ of zero: there the singular vectors are
    arbitrary and the SVD's own choice is the one to reproduce."""
    import scipy.linalg
    a = tau.double()
    n = a.shape[1]
    eigvals, eigvecs = scipy.linalg.eigh((a.mT @ a).numpy(), subset_by_index=[n - k, n - 1],
                                         driver="evr", overwrite_a=True, check_finite=False)
    eigvals, eigvecs = eigvals[::-1].copy(), eigvecs[:, ::-1].copy()  # descending, as the SVD
    if not eigvals[-1] > 1e-10 * eigvals[0]:
        return None
    s = torch.from_numpy(eigvals).sqrt()
    v = torch.from_numpy(eigvecs)
    u = (a @ v) / s
    return u.to(tau.dtype), s.to(tau.dtype), v.mT.to(tau.dtype)


def _inverse_sqrt(gram: torch.Tensor) -> torch.Tensor:
    eigvals, eigvecs = torch.linalg.eigh(gram)
    return eigvecs @ torch.diag(1.0 / (torch.sqrt(torch.abs(eigvals)) + 1e-12)) @ eigvecs.mT


def _polar(x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] < x.shape[1]:  # the polar factor of xᵀ is the transpose; tall SVDs are faster
        return _polar(x.mT).mT
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    return p @ qh


def tsv_merge_key(taus: Iterable[torch.Tensor], num_tasks: int, method: str = "TSVM"
                  ) -> torch.Tensor:
    """The TSV-M delta of one 2-D key from its T task vectors (streamed, one at a time)."""
    u_cat = s_cat = v_cat = None
    exact = method == "TSVM_2"
    zero_tasks = []  # all-zero τ_t: SVD deferred, skipped entirely if every task is zero
    for t, tau in enumerate(taus):
        if u_cat is None:
            (m, n), dtype = tau.shape, tau.dtype
            r = min(m, n)
            k = r // num_tasks
            u_cat, s_cat, v_cat = tau.new_zeros(m, r), tau.new_zeros(r), tau.new_zeros(r, n)
        if not tau.any():
            zero_tasks.append(t)
            continue
        block = slice(t * k, (t + 1) * k)
        u_cat[:, block], s_cat[block], v_cat[block, :] = leading_triplets(tau, k, exact)
    if len(zero_tasks) == num_tasks:
        return torch.zeros(m, n, dtype=dtype)
    for t in zero_tasks:  # the originals' U/V of a zero matrix still shape the polar factors
        block = slice(t * k, (t + 1) * k)
        u_cat[:, block], s_cat[block], v_cat[block, :] = leading_triplets(
            torch.zeros(m, n, dtype=dtype), k)
    if method == "TSVM":
        return torch.linalg.multi_dot((_polar(u_cat), torch.diag(s_cat), _polar(v_cat)))
    s_cat, order = torch.sort(s_cat, stable=True)
    u_cat, v_cat = u_cat[:, order], v_cat[order, :]
    return torch.linalg.multi_dot((u_cat, _inverse_sqrt(u_cat.mT @ u_cat), torch.diag(s_cat),
                                   _inverse_sqrt(v_cat @ v_cat.mT), v_cat))


def tsv_delta(pretrained: StateDict, finetuned: Experts, method: str = "TSVM",
              validate_inputs: bool = True) -> dict[str, torch.Tensor]:
    """The unscaled TSV-M task vector, key by key."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {METHODS}")
    if validate_inputs:
        validate(pretrained, finetuned)
    merged = {}
    for key in merged_keys(pretrained):
        theta0 = as_float(pretrained[key])
        taus = taus_at(theta0, finetuned, key)
        if theta0.ndim == 2 and "text_projection" not in key:
            merged[key] = tsv_merge_key(taus, len(finetuned), method)
            continue
        mean = next(taus)
        for i, tau in enumerate(taus, start=2):  # the originals' running mean
            mean += (tau - mean) / i
        merged[key] = mean
    return merged


def tsv_merging(pretrained: StateDict, finetuned: Experts, alpha: float = 1.0,
                method: str = "TSVM", validate_inputs: bool = True) -> dict[str, torch.Tensor]:
    """θ0 + α·TSV-M. α = 1 is FusionBench's default; the originals pick α from `ALPHA_GRID`
    = {0.1, …, 3.0} on the …Val splits (selection.py)."""
    return apply(pretrained, tsv_delta(pretrained, finetuned, method, validate_inputs), alpha,
                 consume=True)


ALPHA_GRID = [i / 10 for i in range(1, 31)]
