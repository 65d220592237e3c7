"""Iso-C, Iso-CTS, WUDI and CART (METHODS_RECORDS.md §1–4) on hand-computed cases, against direct
float64 transcriptions of the originals' pseudocode, and on the invariants the spec lists (§8)."""
import pytest
import torch

from taskmerge import merging
from taskmerge.merging import cart, iso, wudi
from taskmerge.storage.errors import ConfigError
from vit_toys import TEXT_LEFTOVERS, is_block_matrix, taus_of, vit_like

ONES = torch.ones(2, 2)


def experts_of(*taus, key):
    return {f"task{i}": {key: ONES + tau} for i, tau in enumerate(taus)}


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def svd_keys(theta0):
    return [k for k, v in theta0.items() if v.ndim == 2 and "text_projection" not in k]


# --- Iso-C / Iso-CTS ------------------------------------------------------------------------------

def test_iso_c_by_hand():
    # Σ τ = [[0, 3], [1, 0]]: σ = (3, 1), σ̄ = 2, U Vᵀ = [[0, 1], [1, 0]]
    experts = experts_of(t([[0.0, 2.0], [1.0, 0.0]]), t([[0.0, 1.0], [0.0, 0.0]]), key="w")
    got = merging.iso_merging({"w": ONES}, experts, alpha=0.5)["w"]
    torch.testing.assert_close(got, ONES + 0.5 * t([[0.0, 2.0], [2.0, 0.0]]))


def test_iso_c_flattens_the_spectrum_of_the_sum_and_averages_the_rest():
    theta0, experts = vit_like(3)
    delta = merging.iso_delta(theta0, experts)
    for key in svd_keys(theta0):
        sigma = torch.linalg.svdvals(sum(taus_of(theta0, experts, key)).double())
        if key in TEXT_LEFTOVERS:
            assert torch.equal(delta[key], torch.zeros_like(delta[key])), key  # zero, and no SVD
            continue
        torch.testing.assert_close(torch.linalg.svdvals(delta[key].double()),
                                   torch.full_like(sigma, float(sigma.mean())), rtol=1e-5, atol=0)
    for key in set(delta) - set(svd_keys(theta0)):  # not 2-D, and text_projection: the mean
        torch.testing.assert_close(delta[key], sum(taus_of(theta0, experts, key)) / 3)
    assert "model.steps" not in delta
    merged = merging.iso_merging(theta0, experts, alpha=1.7)
    assert torch.equal(merged["model.steps"], theta0["model.steps"])
    for key in delta:
        torch.testing.assert_close(merged[key], theta0[key] + 1.7 * delta[key])


@pytest.mark.parametrize("r, tasks, expected", [
    (768, 8, (616, 19)), (768, 14, (614, 11)), (768, 20, (608, 8)), (1024, 8, (816, 26)),
    (512, 14, (414, 7)), (50, 8, (42, 1)), (50, 20, (50, 0)), (257, 8, (209, 6)), (77, 8, (61, 2))])
def test_iso_cts_subspace_sizes_round_half_to_even_as_the_original(r, tasks, expected):
    assert iso.subspace_sizes(r, tasks) == expected  # the spec's §2a table, both half-to-even cells


def iso_cts_reference(taus, fraction=0.8):
    """iso-merging's `iso_cts` for one key, line by line, in float64 with torch's SVD throughout."""
    taus = [tau.double() for tau in taus]
    r, num_tasks = min(taus[0].shape), len(taus)
    c = r - num_tasks * round((r - int(r * fraction)) / num_tasks)
    k = (r - c) // num_tasks
    u, s, vh = torch.linalg.svd(sum(taus), full_matrices=False)
    uc, sc, vc = u[:, :c], s[:c], vh[:c, :]
    blocks = [torch.linalg.svd(tau - uc @ uc.T @ tau, full_matrices=False) for tau in taus]
    u_cat = torch.cat([p[:, :k] for p, _, _ in blocks] + [uc], dim=1)
    s_cat = torch.cat([rho[:k] for _, rho, _ in blocks] + [sc])
    v_cat = torch.cat([qh[:k, :] for _, _, qh in blocks] + [vc], dim=0)
    pu, _, qu = torch.linalg.svd(u_cat, full_matrices=False)
    pv, _, qv = torch.linalg.svd(v_cat, full_matrices=False)
    return s_cat.mean() * (pu @ qu) @ (pv @ qv)


def test_iso_cts_is_the_originals_algorithm_with_a_unit_spectrum_over_its_mean():
    theta0, experts = vit_like(2)  # r = 8: c = 6, k = 1 per task; r = 6 (proj): c = 4, k = 1
    delta = merging.iso_delta(theta0, experts, method="iso_cts")
    for key in svd_keys(theta0):
        if key in TEXT_LEFTOVERS:
            assert not delta[key].any(), key
            continue
        want = iso_cts_reference(taus_of(theta0, experts, key))
        torch.testing.assert_close(delta[key].double(), want, rtol=1e-5, atol=1e-6)
        spectrum = torch.linalg.svdvals(delta[key].double())
        torch.testing.assert_close(spectrum / spectrum.mean(), torch.ones_like(spectrum), rtol=1e-5, atol=0)
    in_proj = "model.visual.transformer.resblocks.0.attn.in_proj_weight"  # the positional embedding has
    # r = 5 and k = round(0.5) = 0: Iso-C there; here the task-specific directions change the result
    assert not torch.allclose(delta[in_proj], merging.iso_delta(theta0, experts)[in_proj], atol=1e-4)


def test_iso_cts_does_not_depend_on_the_task_order():
    theta0, experts = vit_like(3)
    shuffled = {task: experts[task] for task in ("task2", "task0", "task1")}
    a = merging.iso_delta(theta0, experts, method="iso_cts")
    b = merging.iso_delta(theta0, shuffled, method="iso_cts")
    for key in svd_keys(theta0):  # float32 rounding of the polar factors: ~1e-6 on entries of ~0.2
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)


def test_iso_cts_without_task_subspaces_is_iso_c():
    theta0, experts = vit_like(5)  # r = 8, 6, 5: (r − ⌊0.8·r⌋)/5 rounds to 0, so k = 0 everywhere
    a = merging.iso_delta(theta0, experts, method="iso_cts")
    b = merging.iso_delta(theta0, experts)
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_iso_rejects_an_unknown_method():
    theta0, experts = vit_like(1)
    with pytest.raises(ConfigError, match="iso_cts"):
        merging.iso_delta(theta0, experts, method="iso")


# --- WUDI -----------------------------------------------------------------------------------------

def small_problem(num_tasks=3, out=4, inp=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(out, inp, generator=g, dtype=torch.float64) for _ in range(num_tasks)]


def test_wudi_gradient_is_two_x_a_minus_b():
    taus = small_problem()
    a, b, tau_sum = wudi.gram_terms(iter(taus))
    torch.testing.assert_close(tau_sum, sum(taus))
    x = torch.randn(4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5),
                    requires_grad=True)
    wudi.loss(x, taus).backward()
    torch.testing.assert_close(wudi.gradient(x.detach(), a, b), x.grad, rtol=1e-10, atol=1e-12)


def test_wudi_closed_form_is_where_a_long_adam_run_ends():
    taus = small_problem()
    a, b, tau_sum = wudi.gram_terms(iter(taus))
    exact = wudi.closed_form(a, b)
    torch.testing.assert_close(exact @ a, b, rtol=1e-9, atol=1e-9)  # X*A = B
    assert wudi.loss(exact, taus) < wudi.loss(tau_sum, taus)
    start = wudi.adam(tau_sum.float(), a, b, steps=300, lr=1e-5)
    assert (start - tau_sum).abs().max() < 300 * 1e-5 * 1.01  # the original's run barely moves
    long = wudi.adam(tau_sum, a, b, steps=4000, lr=1e-2)
    assert (long - exact).abs().max() < 0.02 * exact.abs().max()
    assert (tau_sum - exact).abs().max() > 0.2 * exact.abs().max()  # it had somewhere to go


def test_wudi_adam_takes_the_originals_steps_on_the_literal_loss():
    taus = [tau.float() for tau in small_problem()]
    a, b, tau_sum = wudi.gram_terms(iter(taus))
    x = torch.nn.Parameter(tau_sum.clone())
    optimiser = torch.optim.Adam([x], lr=1e-5)
    for _ in range(20):  # vit/wudi_main.py: autograd of Σ_t ‖(X − τ_t)τ_tᵀ‖² / ‖τ_t‖²
        optimiser.zero_grad()
        wudi.loss(x, taus).backward()
        optimiser.step()
    torch.testing.assert_close(wudi.adam(tau_sum, a, b, steps=20), x.detach(), rtol=0, atol=1e-7)


def test_wudi_limits_one_task_orthogonal_rows_and_proportional_tasks():
    (tau,) = small_problem(1)
    for solver in wudi.SOLVERS:
        theta0 = {"attn.out_proj.weight": torch.zeros(4, 6)}
        experts = {"a": {"attn.out_proj.weight": tau.float()}}
        got = merging.wudi_merging(theta0, experts, solver=solver, lr=1e-2)["attn.out_proj.weight"]
        torch.testing.assert_close(got, tau.float(), rtol=1e-5, atol=1e-6)  # T = 1: ∇L(τ) = 0
    left, right = small_problem(2, inp=3)
    disjoint = [torch.cat([left, torch.zeros(4, 3, dtype=left.dtype)], 1),
                torch.cat([torch.zeros(4, 3, dtype=left.dtype), right], 1)]
    a, b, tau_sum = wudi.gram_terms(iter(disjoint))
    assert torch.equal(wudi.adam(tau_sum, a, b, steps=50, lr=1e-2), tau_sum)  # zero gradient at Σ τ
    torch.testing.assert_close(wudi.closed_form(a, b), tau_sum, rtol=1e-9, atol=1e-9)
    (base,) = small_problem(1)
    a, b, _ = wudi.gram_terms(iter([2.0 * base, -0.5 * base, 1.0 * base]))
    torch.testing.assert_close(wudi.closed_form(a, b), (2.5 / 3) * base, rtol=1e-9, atol=1e-9)  # the mean


def test_wudi_keys_original_blocks_only_fusionbench_every_2d_key():
    theta0, experts = vit_like(3)
    original = merging.wudi_merging(theta0, experts, solver="closed_form")
    fusionbench = merging.wudi_merging(theta0, experts, **merging.WUDI_PRESETS["fusionbench"])
    for key, theta in theta0.items():
        if is_block_matrix(key):
            x = wudi.closed_form(*wudi.gram_terms(iter(taus_of(theta0, experts, key)))[:2])
            torch.testing.assert_close(original[key], theta0[key] + x.float(), rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(original[key], theta), key  # every other key at θ0
        if theta.ndim == 2 and key in TEXT_LEFTOVERS:
            assert torch.equal(fusionbench[key], theta), key  # zero τ: no 0/0 NaN, X stays 0
        elif theta.ndim == 2:
            assert not torch.equal(fusionbench[key], theta), key
        elif theta.is_floating_point():
            torch.testing.assert_close(fusionbench[key], theta + sum(taus_of(theta0, experts, key)) / 3)
    assert all(torch.isfinite(v).all() for v in fusionbench.values())


def test_wudi_singular_a_takes_the_min_norm_solution():
    taus = small_problem(2, out=3, inp=8)  # rank(A) ≤ 6 < 8: c_proj with fewer than 4 tasks
    a, b, _ = wudi.gram_terms(iter(taus))
    exact = wudi.closed_form(a, b)
    torch.testing.assert_close(exact @ a, b, rtol=1e-9, atol=1e-9)
    null = torch.linalg.svd(a)[0][:, 6:]  # A's null space: the min-norm X has no part there
    assert (exact @ null).abs().max() < 1e-9
    damped = wudi.closed_form(a, b, ridge=0.1)  # ε = 0.1·tr(A)/8 = 0.1·2/8
    torch.testing.assert_close(damped @ (a + 0.025 * torch.eye(8, dtype=a.dtype)), b, rtol=1e-9, atol=1e-9)
    assert damped.norm() < exact.norm()


# --- CART -----------------------------------------------------------------------------------------

def test_cart_by_hand():
    key = "model.visual.transformer.resblocks.0.attn.out_proj.weight"
    # τ̄ = diag(3, 2); c = diag(6, −2), diag(−3, 4), diag(−3, −2); rank 1 each: diag(6, 0), diag(0, 4),
    # diag(−3, 0), summing to diag(3, 4); θ = 1 + diag(3, 2) + 0.5·diag(3, 4)
    experts = experts_of(t([[9.0, 0.0], [0.0, 0.0]]), t([[0.0, 0.0], [0.0, 6.0]]), torch.zeros(2, 2), key=key)
    got = merging.cart_merging({key: ONES}, experts, lam=0.5, rank_ratio=0.5)[key]
    torch.testing.assert_close(got, ONES + t([[4.5, 0.0], [0.0, 4.0]]))


@pytest.mark.parametrize("tasks", [8, 14, 20])
def test_cart_presets_give_the_originals_ranks(tasks):
    expected = {8: 92, 14: 122, 20: 245}[tasks]  # the spec's §4b table, r = 768
    assert cart.rank_of((768, 3072), merging.CART_PRESETS[tasks]["rank_ratio"]) == expected


def test_cart_at_lambda_zero_and_on_every_other_key_is_weight_averaging():
    theta0, experts = vit_like(3)
    averaged = merging.weight_averaging(theta0, experts)
    merged = merging.cart_merging(theta0, experts, lam=0.0)
    assert all(torch.equal(merged[key], averaged[key]) for key in theta0)
    merged = merging.cart_merging(theta0, experts, lam=2.0, rank_ratio=0.25)
    for key in theta0:
        if is_block_matrix(key):
            k = max(1, int(0.25 * min(theta0[key].shape)))
            taus = [tau.double() for tau in taus_of(theta0, experts, key)]
            tau_bar = sum(taus) / 3
            residuals = 0
            for tau in taus:
                u, s, vh = torch.linalg.svd(tau - tau_bar, full_matrices=False)
                residuals = residuals + u[:, :k] @ torch.diag(s[:k]) @ vh[:k, :]
            want = theta0[key].double() + tau_bar + 2.0 * residuals
            torch.testing.assert_close(merged[key].double(), want, rtol=1e-5, atol=1e-6)
            assert not torch.allclose(merged[key], averaged[key], atol=1e-3)
        else:
            assert torch.equal(merged[key], averaged[key]), key


def test_cart_at_full_or_zero_rank_is_weight_averaging_for_any_lambda():
    theta0, experts = vit_like(3)
    averaged = merging.weight_averaging(theta0, experts)
    at_zero = merging.cart_merging(theta0, experts, lam=2.0, rank_ratio=0.0)
    assert all(torch.equal(at_zero[key], averaged[key]) for key in theta0)
    at_full = merging.cart_merging(theta0, experts, lam=2.0, rank_ratio=1.0)
    for key in theta0:
        torch.testing.assert_close(at_full[key], averaged[key], rtol=0, atol=1e-6)
    with pytest.raises(ConfigError, match="rank_ratio"):
        merging.cart_merging(theta0, experts, rank_ratio=1.5)
