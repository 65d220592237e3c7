"""Every data-free method on a few 2×3 tensors whose answers are worked out by hand below.

θ0 = 1 everywhere, so a missing "+ θ0" shows. All values are exact binary fractions: the expected
tensors are exact, not approximations.
"""
import pytest
import torch

from taskmerge import merging

ONES = torch.ones(2, 3)
TAU_1 = torch.tensor([[2.0, -1.0, 0.0], [4.0, 1.0, -2.0]])
TAU_2 = torch.tensor([[1.0, 3.0, 0.0], [-2.0, 1.0, -4.0]])


def t(rows):
    return torch.tensor(rows, dtype=torch.float32)


def experts_of(*taus, key="w", theta0=ONES):
    return {f"task{i}": {key: theta0 + tau} for i, tau in enumerate(taus)}


def test_task_arithmetic_and_weight_averaging_by_hand():
    theta0, experts = {"w": ONES}, experts_of(TAU_1, TAU_2)
    # Σ τ = [[3, 2, 0], [2, 2, -6]]
    assert torch.equal(merging.task_arithmetic(theta0, experts, lam=0.5)["w"],
                       t([[2.5, 2.0, 1.0], [2.0, 2.0, -2.0]]))
    assert torch.equal(merging.weight_averaging(theta0, experts)["w"],
                       t([[2.5, 2.0, 1.0], [2.0, 2.0, -2.0]]))
    # the EnnengYang bug: τ_2 dropped, weight still 1/2 → 1 + τ_1/2
    assert torch.equal(merging.weight_averaging(theta0, experts, drop_last=True)["w"],
                       t([[2.0, 0.5, 1.0], [3.0, 1.5, 0.0]]))


# TIES, k = 0.5 of D = 6: keep |τ| ≥ the 3rd smallest |τ| of each task (ties kept).
TIES_TAUS = [
    t([[3.0, -1.0, 0.5], [4.0, 2.0, -6.0]]),    # |τ| sorted 0.5 1 2 3 4 6 → keep ≥ 2
    t([[-2.0, 5.0, -1.0], [0.5, -3.0, 4.0]]),   # 0.5 1 2 3 4 5 → keep ≥ 2
    t([[-1.0, -4.0, 2.0], [0.5, 1.0, 3.0]]),    # 0.5 1 1 2 3 4 → keep ≥ 1 (both 1s)
]
# trimmed: [[3,0,0],[4,2,-6]], [[-2,5,0],[0,-3,4]], [[-1,-4,2],[0,1,3]]
# Σ trimmed = [[0, 1, 2], [4, 0, 1]] → two zero signs; Σ signs = +4 → majority + → all elected +
# selected (positive entries): [[3,0,0],[4,2,0]], [[0,5,0],[0,0,4]], [[0,0,2],[0,1,3]]
TIES_MERGED = {
    "dis-sum": t([[3.0, 5.0, 2.0], [4.0, 3.0, 7.0]]),
    "dis-mean": t([[3.0, 5.0, 2.0], [4.0, 1.5, 3.5]]),   # counts [[1,1,1],[1,2,2]]
    "dis-max": t([[3.0, 5.0, 2.0], [4.0, 2.0, 4.0]]),
}


@pytest.mark.parametrize("merge", sorted(TIES_MERGED))
def test_ties_by_hand(merge):
    theta0, experts = {"w": ONES}, experts_of(*TIES_TAUS)
    got = merging.ties_merging(theta0, experts, k=0.5, merge=merge, lam=0.5)["w"]
    assert torch.equal(got, ONES + 0.5 * TIES_MERGED[merge])


def test_ties_selected_by_hand():
    theta0, experts = {"w": ONES}, experts_of(*TIES_TAUS)
    selected = merging.ties_selected(theta0, experts, k=0.5)
    assert torch.equal(selected["task0"]["w"], t([[3, 0, 0], [4, 2, 0]]))
    assert torch.equal(selected["task1"]["w"], t([[0, 5, 0], [0, 0, 4]]))
    assert torch.equal(selected["task2"]["w"], t([[0, 0, 2], [0, 1, 3]]))


def test_ties_majority_sign_fills_exact_cancellation():
    # Σ = [[0, -1, -2], ...]: the zero at (0,0) takes the majority sign, here −.
    taus = [t([[1.0, -1.0, -1.0], [-1.0, -1.0, -1.0]]), t([[-1.0, 0.0, -1.0], [-1.0, -1.0, 0.0]])]
    got = merging.ties_delta({"w": ONES}, experts_of(*taus), k=1.0, merge="dis-sum")["w"]
    assert torch.equal(got, t([[-1.0, -1.0, -2.0], [-2.0, -2.0, -1.0]]))


def test_ties_trim_is_global_over_keys():
    # D = 6 over two keys, k = 0.5: k_th = 6 − int(3) = 3, threshold = 3rd smallest |τ| of the
    # whole model = 0.3, itself kept (so int(D·k) + 1 entries survive, as in the original). A
    # per-key trim would instead keep entries of "small" by their rank within "small".
    theta0 = {"big": torch.zeros(3), "small": torch.zeros(3)}
    experts = {"a": {"big": t([5.0, -6.0, 7.0]), "small": t([0.1, -0.2, 0.3])}}
    got = merging.ties_delta(theta0, experts, k=0.5)
    assert torch.equal(got["big"], t([5.0, -6.0, 7.0]))
    assert torch.equal(got["small"], t([0.0, 0.0, 0.3]))


def test_emr_by_hand():
    theta0 = {"w": ONES, "b": torch.zeros(2)}
    experts = {"task0": {"w": ONES + TAU_1, "b": t([1.0, -1.0])},
               "task1": {"w": ONES + TAU_2, "b": t([3.0, 1.0])}}
    # w: mean = [[1.5, 1, 0], [1, 1, -3]] → s = [[+,+,−],[+,+,−]] (0 elects −)
    #    M_1 = [[1,0,0],[1,1,1]], M_2 = [[1,1,0],[0,1,1]], τ_uni = [[2, 3, 0], [4, 1, -4]]
    # b: mean = [2, 0] → s = [+, −]; M_1 = [1, 1], M_2 = [1, 0]; τ_uni = [3, -1]
    emr = merging.emr_merging(theta0, experts)
    assert torch.equal(emr.tau_uni["w"], t([[2.0, 3.0, 0.0], [4.0, 1.0, -4.0]]))
    assert torch.equal(emr.tau_uni["b"], t([3.0, -1.0]))
    # code: λ_1 = (10/6 + 1) / (11/6 + 2) = 16/23, λ_2 = (11/6 + 2) / (10/6 + 3/2) = 23/19
    torch.testing.assert_close(emr.rescalers, torch.tensor([16 / 23, 23 / 19]))
    m1_uni = t([[2.0, 0.0, 0.0], [4.0, 1.0, -4.0]])
    torch.testing.assert_close(emr.task_state_dict(theta0, "task0")["w"], ONES + 16 / 23 * m1_uni)
    torch.testing.assert_close(emr.task_state_dict(theta0, 1)["b"], 23 / 19 * t([3.0, 0.0]))
    # paper: whole-vector sums, λ_1 = (10 + 2) / (11 + 4) = 0.8, λ_2 = (11 + 4) / (10 + 3) = 15/13
    paper = merging.emr_merging(theta0, experts, rescaler="paper")
    torch.testing.assert_close(paper.rescalers, torch.tensor([0.8, 15 / 13]))


def test_tsv_merge_by_hand():
    # r = 2, T = 2 → k = 1 triplet per task. τ_1's top triplet is 3·e1e1ᵀ (its 1 at (1,1) is
    # cut), τ_2's is 2·e2e3ᵀ; the directions are already orthogonal, so the polar factors change
    # nothing and Δ = [[3, 0, 0], [0, 0, 2]]. Non-2-D "b" and text_projection are averaged.
    tau_1, tau_2 = t([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), t([[0.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    theta0 = {"w": ONES, "b": torch.zeros(2), "model.text_projection": torch.zeros(2, 2)}
    experts = {"a": {"w": ONES + tau_1, "b": t([1.0, 3.0]), "model.text_projection": torch.eye(2)},
               "b": {"w": ONES + tau_2, "b": t([3.0, -1.0]),
                     "model.text_projection": 3 * torch.eye(2)}}
    for method in ("TSVM", "TSVM_2"):
        got = merging.tsv_merging(theta0, experts, alpha=0.5, method=method)
        torch.testing.assert_close(got["w"], ONES + 0.5 * t([[3.0, 0.0, 0.0], [0.0, 0.0, 2.0]]))
        torch.testing.assert_close(got["b"], 0.5 * t([2.0, 1.0]))
        torch.testing.assert_close(got["model.text_projection"], torch.eye(2))  # 0.5 · mean(I, 3I)


def test_tsv_compress_by_hand():
    tau_1, tau_2 = t([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0]]), t([[0.0, 0.0, 0.0], [0.0, 0.0, 2.0]])
    theta0 = {"w": ONES, "b": torch.zeros(2)}
    experts = {"a": {"w": ONES + tau_1, "b": t([1.0, 3.0])},
               "b": {"w": ONES + tau_2, "b": t([3.0, -1.0])}}
    tsvc = merging.tsv_compress(theta0, experts)
    a = tsvc.task_state_dict(theta0, "a")
    torch.testing.assert_close(a["w"], ONES + t([[3.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert torch.equal(a["b"], t([1.0, 3.0]))
    torch.testing.assert_close(tsvc.task_state_dict(theta0, 1)["w"],
                               ONES + t([[0.0, 0.0, 0.0], [0.0, 0.0, 2.0]]))
    # rank 1 of a 2×3 matrix: U 2×1 + S 1 + Vᵀ 1×3 = 6 floats, plus the dense 2-vector "b"
    assert tsvc.storage_report()["per_task_bytes"] == [(6 + 2) * 4, (6 + 2) * 4]


def test_tall_masks_and_consensus_by_hand():
    theta0, experts = {"w": ONES}, experts_of(TAU_1, TAU_2)
    # τ_MTL = [[3, 2, 0], [2, 2, -6]]; m_t(0.5) = |τ_t| > 0.5·|τ_MTL − τ_t| = 0.5·|τ_other|
    # m_1: [2,1,0 | 4,1,2] > [0.5,1.5,0 | 1,0.5,2] → [[1,0,0],[1,1,0]]
    # m_2: [1,3,0 | 2,1,4] > [1,0.5,0 | 2,0.5,1]   → [[0,1,0],[0,1,1]]
    tall = merging.tall_masks(theta0, experts, 0.5)
    assert torch.equal(tall.mask(0)["w"], torch.tensor([[1, 0, 0], [1, 1, 0]], dtype=torch.bool))
    assert torch.equal(tall.mask(1)["w"], torch.tensor([[0, 1, 0], [0, 1, 1]], dtype=torch.bool))
    assert torch.equal(tall.task_state_dict(theta0, 0)["w"], t([[4.0, 1.0, 1.0], [3.0, 3.0, 1.0]]))
    assert torch.equal(tall.task_state_dict(theta0, 1)["w"], t([[1.0, 3.0, 1.0], [1.0, 3.0, -5.0]]))
    # counts [[1,1,0],[1,2,1]]: k = 2 keeps only (1,1); k = 1 keeps every used weight
    assert torch.equal(merging.consensus_merging(theta0, tall, alpha=0.5, k=2)["w"],
                       t([[1.0, 1.0, 1.0], [1.0, 2.0, 1.0]]))
    assert torch.equal(merging.consensus_merging(theta0, tall, alpha=0.5, k=1)["w"],
                       t([[2.5, 2.0, 1.0], [2.0, 2.0, -2.0]]))


def test_validation_grids_are_the_originals():
    # tall_masks src/eval/eval.py: linspace(0, 1, n_eval_points // 2 + 1)[1:] with n_eval_points = 21;
    # TSV: linspace(0, 1, 31)[1:]
    import numpy as np

    from taskmerge.merging.task_arithmetic import LAM_GRID_TALL, LAM_GRID_TSV
    np.testing.assert_allclose(LAM_GRID_TALL, np.linspace(0, 1, 21 // 2 + 1)[1:], rtol=0, atol=1e-12)
    np.testing.assert_allclose(LAM_GRID_TSV, np.linspace(0, 1, 31)[1:], rtol=0, atol=1e-12)
    assert len(LAM_GRID_TALL) == 10 and LAM_GRID_TALL[0] == 0.1
