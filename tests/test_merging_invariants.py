"""Identities between the methods that hold exactly (or to float rounding) and can fail.

Small random models with the shapes that matter: 2-D matrices, a `text_projection` (excluded from
TSV-M's SVD), a 4-D conv, 1-D and 0-D tensors, and an int64 buffer that no method may touch.
"""
import pytest
import torch

from taskmerge import merging
from taskmerge.merging.ties import PRESETS

SHAPES = {"w": (12, 8), "model.text_projection": (6, 6), "conv": (4, 3, 2, 2), "b": (12,),
          "scale": ()}


def make(num_tasks: int, seed: int = 0, same_sign: bool = False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    theta0 = {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}
    theta0["steps"] = torch.tensor([7], dtype=torch.int64)
    pattern = {k: torch.sign(torch.randn(s, generator=g)) for k, s in SHAPES.items()}
    experts = {}
    for t in range(num_tasks):
        expert = {}
        for k, s in SHAPES.items():
            tau = 0.1 * torch.randn(s, generator=g)
            if same_sign:
                tau = pattern[k] * tau.abs()
            expert[k] = theta0[k] + tau
        expert["steps"] = torch.tensor([100 + t], dtype=torch.int64)  # must never leak in
        experts[f"task{t}"] = {k: v.to(dtype) if v.is_floating_point() else v
                               for k, v in expert.items()}
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in theta0.items()}, experts


def assert_same(a: dict, b: dict, atol=0.0, rtol=0.0):
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=rtol, msg=lambda m: f"{k}: {m}")


def test_weight_averaging_is_task_arithmetic_at_one_over_t():
    theta0, experts = make(5)
    assert_same(merging.weight_averaging(theta0, experts),
                merging.task_arithmetic(theta0, experts, lam=1 / 5))
    first_four = dict(list(experts.items())[:4])
    buggy = merging.weight_averaging(theta0, experts, drop_last=True)
    assert_same(buggy, merging.task_arithmetic(theta0, first_four, lam=1 / 5))
    assert not torch.equal(buggy["w"], merging.weight_averaging(theta0, experts)["w"])


def test_ties_without_trim_or_conflicts_is_task_arithmetic():
    theta0, experts = make(4, same_sign=True)
    preset = {**PRESETS["ennengyang"], "k": 1.0}
    assert_same(merging.ties_merging(theta0, experts, **preset),
                merging.task_arithmetic(theta0, experts, lam=preset["lam"]), atol=1e-7)
    # with sign conflicts the disjoint merge drops entries, so the identity must break
    theta0, experts = make(4, same_sign=False)
    assert not torch.allclose(merging.ties_merging(theta0, experts, **preset)["w"],
                              merging.task_arithmetic(theta0, experts, lam=0.3)["w"])


def test_ties_tall_masks_preset_needs_a_lambda():
    theta0, experts = make(2)
    with pytest.raises(ValueError, match="λ"):
        merging.ties_merging(theta0, experts, **PRESETS["tall_masks"])


def test_emr_with_one_task_reconstructs_the_expert():
    theta0, experts = make(1)
    emr = merging.emr_merging(theta0, experts)
    assert emr.rescalers.tolist() == [1.0]
    expert = experts["task0"]
    for k in SHAPES:
        assert torch.equal(emr.task_delta(0)[k], expert[k] - theta0[k])
    assert_same(emr.task_state_dict(theta0, 0), expert | {"steps": theta0["steps"]},
                atol=1e-6, rtol=1e-6)


def test_tsv_merge_with_one_task_is_task_arithmetic_at_one():
    theta0, experts = make(1)
    want = merging.task_arithmetic(theta0, experts, lam=1.0)
    for method in ("TSVM", "TSVM_2"):
        assert_same(merging.tsv_merging(theta0, experts, alpha=1.0, method=method), want,
                    atol=1e-5, rtol=0)


def test_tsv_merge_keeps_text_projection_out_of_the_svd():
    theta0, experts = make(3)
    merged = merging.tsv_delta(theta0, experts)
    mean = sum(e["model.text_projection"] - theta0["model.text_projection"]
               for e in experts.values()) / 3
    torch.testing.assert_close(merged["model.text_projection"], mean)
    # "w" (12×8, k = 8 // 3 = 2 per task) goes through the SVD: rank ≤ 3·2, not the mean
    assert torch.linalg.matrix_rank(merged["w"]) <= 6


def test_tsv_merge_of_all_zero_key_is_zero():
    theta0, experts = make(3)
    for e in experts.values():
        e["w"] = theta0["w"].clone()
    assert torch.equal(merging.tsv_delta(theta0, experts)["w"], torch.zeros(12, 8))


@pytest.mark.parametrize("shape", [(60, 24), (24, 60), (32, 32)])
def test_leading_triplets_are_the_svds_leading_triplets(shape):
    from taskmerge.merging.tsv import leading_triplets
    g = torch.Generator().manual_seed(1)
    tau = torch.randn(shape, generator=g) @ torch.diag(torch.linspace(3, 0.1, shape[1]))
    k = min(shape) // 3
    u, s, vh = leading_triplets(tau, k)
    u64, s64, vh64 = torch.linalg.svd(tau.double(), full_matrices=False)
    assert u.shape == (shape[0], k) and s.shape == (k,) and vh.shape == (k, shape[1])
    torch.testing.assert_close(s.double(), s64[:k], atol=1e-5, rtol=1e-6)
    # each triplet up to the sign a pair (u_i, v_i) may share: compare the rank-1 terms
    for i in range(k):
        torch.testing.assert_close(torch.outer(u[:, i], vh[i]).double(),
                                   torch.outer(u64[:, i], vh64[i]), atol=1e-5, rtol=0)
    torch.testing.assert_close(u.mT @ u, torch.eye(k), atol=1e-5, rtol=0)


def test_leading_triplets_of_a_rank_deficient_matrix_are_the_svds_own():
    # below rank the singular vectors are arbitrary: the SVD's choice is reproduced exactly
    from taskmerge.merging.tsv import leading_triplets
    g = torch.Generator().manual_seed(2)
    tau = torch.randn(40, 2, generator=g) @ torch.randn(2, 20, generator=g)  # rank 2, k = 5
    u, s, vh = leading_triplets(tau, 5)
    u_ref, s_ref, vh_ref = torch.linalg.svd(tau, full_matrices=False)
    assert torch.equal(u, u_ref[:, :5]) and torch.equal(s, s_ref[:5]) and torch.equal(vh, vh_ref[:5])


@pytest.mark.parametrize("shape", [(60, 24), (24, 60), (32, 32)])
def test_polar_factor_is_the_svds_polar_factor(shape):
    from taskmerge.merging.tsv import polar_factor
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g)
    p64, _, qh64 = torch.linalg.svd(x.double(), full_matrices=False)
    got = polar_factor(x)
    assert got.dtype == x.dtype and got.shape == x.shape
    torch.testing.assert_close(got.double(), p64 @ qh64, atol=1e-6, rtol=0)


def test_polar_factor_of_an_ill_conditioned_matrix_is_the_svds():
    # two equal columns: the polar factor is not unique, the Gram's inverse root would blow up
    from taskmerge.merging.tsv import polar_factor
    x = torch.randn(30, 6, generator=torch.Generator().manual_seed(4))
    x[:, 5] = x[:, 4]
    p, _, qh = torch.linalg.svd(x, full_matrices=False)
    assert torch.equal(polar_factor(x), p @ qh)


def test_tsv_compress_at_full_rank_reconstructs_every_expert():
    theta0, experts = make(3)
    tsvc = merging.tsv_compress(theta0, experts, rank=10**6)
    for t, expert in enumerate(experts.values()):
        assert_same(tsvc.task_state_dict(theta0, t), expert | {"steps": theta0["steps"]},
                    atol=1e-5, rtol=0)
    # the default rank r // T truncates, and TSV-C (unlike TSV-M) compresses text_projection
    default = merging.tsv_compress(theta0, experts)
    assert default.factors[0]["model.text_projection"][1].numel() == 6 // 3
    assert not torch.allclose(default.task_state_dict(theta0, 0)["w"], experts["task0"]["w"])


def test_tall_mask_at_lambda_zero_keeps_mtl_wherever_the_task_moved():
    theta0, experts = make(3)
    experts["task1"]["w"][:4] = theta0["w"][:4]  # τ_1 = 0 on the first rows
    tall = merging.tall_masks(theta0, experts, 0.0)
    for t, expert in enumerate(experts.values()):
        delta = tall.task_delta(t)
        for k in SHAPES:
            moved = expert[k] != theta0[k]
            assert torch.equal(delta[k], torch.where(moved, tall.tau_mtl[k], torch.zeros(())))
    assert not tall.mask(1)["w"][:4].any()


def test_consensus_with_k_zero_is_task_arithmetic_and_above_t_is_zeroshot():
    theta0, experts = make(4)
    tall = merging.tall_masks(theta0, experts, [0.2, 0.3, 0.5, 0.6])
    assert_same(merging.consensus_merging(theta0, tall, alpha=0.4, k=0),
                merging.task_arithmetic(theta0, experts, lam=0.4))
    assert_same(merging.consensus_merging(theta0, tall, alpha=0.4, k=5), theta0)


def test_half_precision_is_merged_in_float32_and_returned_in_half():
    theta0, experts = make(3, dtype=torch.float16)
    merged = merging.ties_merging(theta0, experts, k=0.5, lam=0.3)
    assert all(merged[k].dtype == torch.float16 for k in SHAPES)
    as32 = ({k: v.float() if v.is_floating_point() else v for k, v in theta0.items()},
            {t: {k: v.float() if v.is_floating_point() else v for k, v in e.items()}
             for t, e in experts.items()})
    want = merging.ties_merging(*as32, k=0.5, lam=0.3)
    assert all(torch.equal(merged[k], want[k].half()) for k in SHAPES)


@pytest.mark.parametrize("run", [
    lambda p, e: merging.weight_averaging(p, e),
    lambda p, e: merging.ties_merging(p, e),
    lambda p, e: merging.tsv_merging(p, e),
    lambda p, e: merging.emr_merging(p, e).task_state_dict(p, 1),
    lambda p, e: merging.tsv_compress(p, e).task_state_dict(p, 1),
    lambda p, e: merging.tall_masks(p, e, 0.4).task_state_dict(p, 1),
])
def test_integer_buffers_keep_the_pretrained_value(run):
    theta0, experts = make(3)
    assert torch.equal(run(theta0, experts)["steps"], theta0["steps"])
