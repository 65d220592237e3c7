"""DARE and PCB-Merging (METHODS_RECORDS.md §5–6): DARE's identity at p = 0, its expectation, its
seeded masks; PCB on a hand-computed case and against a direct transcription of `pcb_ES.py`."""
import math

import pytest
import torch

from taskmerge import merging
from taskmerge.merging import dare as dare_module
from taskmerge.storage.errors import ConfigError
from vit_toys import TEXT_LEFTOVERS, vit_like


def assert_same(a: dict, b: dict):
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --- DARE -----------------------------------------------------------------------------------------

def test_dare_at_p_zero_is_the_identity_of_the_base_methods():
    theta0, experts = vit_like(3)
    dropped = merging.drop_and_rescale(theta0, experts, p=0.0)
    for task, expert in experts.items():
        assert_same({k: dropped[task][k] for k in expert}, expert)
    assert_same(merging.dare_task_arithmetic(theta0, experts, p=0.0, lam=0.3),
                merging.task_arithmetic(theta0, experts, lam=0.3))
    assert_same(merging.dare_ties(theta0, experts, p=0.0, lam=0.5),
                merging.ties_merging(theta0, experts, lam=0.5))


def big_case(p, seed=0, numel=3 * dare_module.DRAW_BLOCK + 1000):
    g = torch.Generator().manual_seed(7)
    theta0 = {"w": torch.randn(numel, generator=g)}
    expert = {"w": theta0["w"] + 0.01 * torch.randn(numel, generator=g)}
    dropped = merging.drop_and_rescale(theta0, {"a": expert}, p=p, seed=seed)["a"]
    return theta0["w"], expert["w"] - theta0["w"], dropped["w"] - theta0["w"]


@pytest.mark.parametrize("p", [0.5, 0.9])
def test_dare_keeps_one_minus_p_and_preserves_the_expectation(p):
    _, tau, tau_tilde = big_case(p)
    kept = tau_tilde != 0
    # 197k draws: the keep fraction's standard deviation is ≤ 0.0012; the tolerance is 5σ or more
    assert abs(float(kept.double().mean()) - (1 - p)) < 0.006
    # θ̃ = θ0 + τ/(1 − p) is stored in float32, as fine-tuned weights are: |θ0| < 6 here, ulp ≤ 5e-7
    torch.testing.assert_close(tau_tilde[kept], tau[kept] / (1 - p), rtol=0, atol=1e-6)
    assert torch.equal(tau_tilde[~kept], torch.zeros_like(tau_tilde[~kept]))  # exactly θ0
    unbiased = float((tau_tilde.double() * tau).sum() / tau.double().square().sum())  # E[τ̃] = τ
    assert abs(unbiased - 1) < 0.03
    without_rescale = merging.drop_and_rescale({"w": torch.zeros(4)}, {"a": {"w": torch.ones(4)}}, p=p,
                                               rescale=False)
    assert set(without_rescale["a"]["w"].tolist()) <= {0.0, 1.0}


def test_dare_seed_and_task_fix_the_mask_whatever_the_order_of_reads():
    _, _, first = big_case(0.5, seed=3)
    _, _, again = big_case(0.5, seed=3)
    _, _, other = big_case(0.5, seed=4)
    assert torch.equal(first, again)
    assert (first != other).float().mean() > 0.3
    theta0 = {"w": torch.zeros(3 * dare_module.DRAW_BLOCK)}
    same = {"w": torch.ones(3 * dare_module.DRAW_BLOCK)}
    dropped = merging.drop_and_rescale(theta0, {"a": same, "b": same}, p=0.5, seed=3)
    assert (dropped["a"]["w"] != dropped["b"]["w"]).float().mean() > 0.3  # each task its own mask
    whole = dropped["a"]["w"]
    for start, stop in [(dare_module.DRAW_BLOCK - 5, 2 * dare_module.DRAW_BLOCK + 9), (17, 18), (0, 0)]:
        assert torch.equal(dropped["a"].read_flat("w", start, stop), whole[start:stop])


def test_dare_ties_is_seeded_and_dare_rejects_p_one():
    theta0, experts = vit_like(3)
    assert_same(merging.dare_ties(theta0, experts, seed=1), merging.dare_ties(theta0, experts, seed=1))
    assert not torch.equal(merging.dare_ties(theta0, experts, seed=1)["model.visual.proj"],
                           merging.dare_ties(theta0, experts, seed=2)["model.visual.proj"])
    with pytest.raises(ConfigError, match="p=1.0"):
        merging.drop_and_rescale(theta0, experts, p=1.0)


# --- PCB ------------------------------------------------------------------------------------------

def test_pcb_by_hand():
    # d = 8: the magnitude clamp is [q0, q6] = [0, 2] for both tasks (4 → 2), n = a / 2;
    # β_t = e^{2n²}(tanh(n²) + tanh(ŝ_1ŝ_2)): 2e²·tanh(1) ≈ 11.255 at entry 0 for both tasks, 0 or
    # ≤ 2e^½·tanh(¼) ≈ 0.81 elsewhere; r = 0.25 puts the lower clamp at q6 ≈ 0.81, so w_t = e_0
    tau_1 = [4.0, 2.0, 1.0, 1.0, 1.0, 1.0, 0.0, -1.0]
    tau_2 = [2.0, -4.0, 1.0, -1.0, 1.0, 0.0, 1.0, 1.0]
    assert math.isclose(2 * math.exp(2) * math.tanh(1), 11.2549, rel_tol=1e-4)
    ones = torch.ones(2, 4)
    experts = {"a": {"w": ones + torch.tensor(tau_1).view(2, 4)},
               "b": {"w": ones + torch.tensor(tau_2).view(2, 4)}}
    got = merging.pcb_merging({"w": ones}, experts, ratio=0.25, lams=[1.0, 0.5])["w"]
    # entry 0: (1·2·1 + 0.5·2·1) / (1 + 1); Σ_t w_t = 0 elsewhere
    assert torch.equal(got, ones + torch.tensor([[1.5, 0, 0, 0], [0, 0, 0, 0]]))


def pcb_reference(theta0, experts, ratio=0.05, lam=1.2):
    """`pcb_ES.py` over the sorted-key flattened task vectors, with full sorts, in float64."""
    keys = sorted(k for k, v in theta0.items() if v.is_floating_point())
    rows = torch.stack([torch.cat([(e[k] - theta0[k]).double().reshape(-1) for k in keys])
                        for e in experts.values()])
    num_tasks, d = rows.shape

    def clamp_rows(x, low_q, high_q=None):
        ordered = x.sort(dim=1).values
        low = ordered[:, int(d * low_q)][:, None]
        high = ordered[:, int(d * high_q) - 1][:, None] if high_q else x.max(1, keepdim=True).values
        return x.clamp(low, high)

    def minmax_rows(x):
        low, high = x.min(1, keepdim=True).values, x.max(1, keepdim=True).values
        return (x - low) / (high - low)

    magnitude = clamp_rows(rows.abs(), 0.01, 0.99)
    normed = minmax_rows(magnitude)
    signed = rows.sign() * normed
    beta = torch.exp(num_tasks * normed ** 2) * torch.tanh(signed[:, None] * signed[None]).sum(1)
    weights = minmax_rows(clamp_rows(beta, 1 - ratio))
    merged = (lam * rows.sign() * magnitude * weights).sum(0) / weights.sum(0).clamp(min=1e-12)
    out, offset = {}, 0
    for key in keys:
        n = theta0[key].numel()
        out[key] = theta0[key] + merged[offset:offset + n].view(theta0[key].shape).float()
        offset += n
    return out


def test_pcb_is_the_originals_algorithm_on_a_vit_shaped_model():
    theta0, experts = vit_like(3)
    got = merging.pcb_merging(theta0, experts)
    want = pcb_reference(theta0, experts)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6)
    assert torch.equal(got["model.steps"], theta0["model.steps"])
    assert all(torch.equal(got[key], theta0[key]) for key in TEXT_LEFTOVERS)  # τ = 0 merges to 0
    moved = torch.cat([(got[k] - theta0[k]).reshape(-1) for k in want]) != 0
    assert 0 < float(moved.float().mean()) < 3 * 0.05 * 1.05  # only entries in some task's top 5 %


def test_pcb_needs_one_lambda_per_task():
    theta0, experts = vit_like(2)
    with pytest.raises(ConfigError, match="one λ_t per task"):
        merging.pcb_merging(theta0, experts, lams=[1.0, 1.0, 1.0])


def test_pcb_quantile_of_streams_is_the_sorts_with_ties_and_signs():
    from taskmerge.merging.pcb import CHUNK, KthLargest
    g = torch.Generator().manual_seed(2)
    stream = torch.cat([torch.randn(3 * CHUNK, generator=g), torch.zeros(CHUNK),   # ties at 0
                        torch.full((500,), 0.125), -torch.rand(1000, generator=g) * 1e-30])  # a tie, tiny negatives
    stream = stream[torch.randperm(stream.numel(), generator=g)]
    streams = torch.stack([stream, -stream, stream * 1e6])
    ordered = streams.sort(dim=1).values
    for count in (1, 1000, CHUNK + 7, 2 * CHUNK, streams.shape[1]):  # 2·CHUNK: a tied 0; the last: the minimum
        largest = KthLargest(len(streams), count)
        pieces = streams.split(CHUNK // 3, dim=1)
        for piece in pieces:
            largest.count_pass(piece)
        for piece in reversed(pieces):   # the second pass may read the chunks in any order
            largest.keep_pass(piece)
        assert largest.bounds() == [[float(o[-count]), float(o[-1])] for o in ordered], count