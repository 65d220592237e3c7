"""The key-by-key merges against straightforward in-memory versions of the originals.

The references below work the way the original repositories do: flatten every state dict in sorted
key order into one row per task (TIES, TALL), or hold every task vector in memory and loop (EMR,
TSV). The library never flattens or stacks the model, so agreement to 1e-6 shows that streaming per
key changes nothing. The experts are the embedded tiny CLIP with seeded low-rank + sparse + noise
changes on the vision tower; the text-side leftovers keep exactly zero task vectors, as in real
checkpoints.
"""
import pytest
import torch
from safetensors.torch import save_file

from taskmerge import merging
from taskmerge.models.encoders import build_image_encoder
from taskmerge.storage.checkpoints import open_state_dict

TASKS = ["A", "B", "C", "D"]
ATOL = 1e-6


def perturb(theta0: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, w in theta0.items():
        if ".visual." not in key:  # text-side leftovers: never trained
            out[key] = w.clone()
            continue
        change = 2e-3 * torch.randn(w.shape, generator=g)
        sparse = torch.rand(w.shape, generator=g) < 0.02
        change += 0.05 * torch.randn(w.shape, generator=g) * sparse
        if w.ndim == 2:
            rank = 4
            change += (0.02 * torch.randn(w.shape[0], rank, generator=g)
                       @ torch.randn(rank, w.shape[1], generator=g)) / rank
        out[key] = w + change
    return out


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    theta0 = {k: v.clone() for k, v in build_image_encoder("taskmerge-tiny").state_dict().items()}
    experts = {task: perturb(theta0, seed=i + 1) for i, task in enumerate(TASKS)}
    return theta0, experts


def flatten(sd: dict) -> torch.Tensor:
    return torch.cat([sd[k].reshape(-1) for k in sorted(sd)])


def unflatten(vec: torch.Tensor, like: dict) -> dict:
    out, i = {}, 0
    for k in sorted(like):
        n = like[k].numel()
        out[k] = vec[i:i + n].reshape(like[k].shape)
        i += n
    return out


def assert_state_close(got: dict, want: dict, atol=ATOL):
    assert list(got) == list(want) or set(got) == set(want)
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        torch.testing.assert_close(got[k], want[k], atol=atol, rtol=0, msg=lambda m: f"{k}: {m}")


# --- references ------------------------------------------------------------------------------

def ref_flat(theta0, experts):
    ptm = flatten(theta0)
    ft = torch.stack([flatten(e) for e in experts.values()])
    return ptm, ft, ft - ptm


def ref_ties_parts(tvs, K):
    if K < 1.0:
        d = tvs.shape[1]
        k = d - int(d * K)
        kth = tvs.abs().kthvalue(k, dim=1, keepdim=True).values
        tvs = tvs * (tvs.abs() >= kth)
    sign = torch.sign(tvs.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    selected = tvs * torch.where(sign.unsqueeze(0) > 0, tvs > 0, tvs < 0)
    return sign, selected


def ref_ties(tvs, K, merge):
    sign, sel = ref_ties_parts(tvs, K)
    if merge == "dis-sum":
        return sel.sum(dim=0)
    if merge == "dis-mean":
        return sel.sum(dim=0) / torch.clamp((sel != 0).sum(dim=0).float(), min=1)
    return sel.abs().max(dim=0).values * sign


def ref_emr(taus: list, paper: bool):
    reduce = torch.sum if paper else torch.mean
    T = len(taus)
    uni, masks = {}, {}
    scales, new_scales = torch.zeros(T, dtype=torch.float64), torch.zeros(T, dtype=torch.float64)
    for n in taus[0]:
        flag = (torch.stack([tv[n] for tv in taus]).mean(0) > 0) * 2 - 1
        biggest = torch.zeros_like(taus[0][n])
        masks[n] = []
        for m, tv in enumerate(taus):
            mask = (tv[n] * flag) > 0
            masks[n].append(mask)
            a = torch.abs(mask * tv[n])
            biggest = torch.where(a > biggest, a, biggest)
            scales[m] += float(reduce(tv[n].abs()))
        uni[n] = biggest * flag
    for m in range(T):
        for n in uni:
            new_scales[m] += float(reduce((uni[n] * masks[n][m]).abs()))
    return uni, masks, (scales / new_scales).float()


def ref_tsvm(taus: list, key: str):
    """TSVM as the originals' batched variant writes it: stacked SVD, compact U_cat, Procrustes."""
    stacked = torch.stack([tv[key] for tv in taus])
    u, s, vt = torch.linalg.svd(stacked, full_matrices=False)
    rp = min(stacked.shape[1:]) // len(taus)
    u, s, vt = u[:, :, :rp], s[:, :rp], vt[:, :rp, :]
    u_hat = u.permute(1, 0, 2).reshape(u.shape[1], -1)
    vt_hat = vt.reshape(-1, vt.shape[2])

    def procrustes(x):
        a, _, bh = torch.linalg.svd(x, full_matrices=False)
        return a @ bh
    return procrustes(u_hat) @ torch.diag(s.reshape(-1)) @ procrustes(vt_hat.T).T


def ref_tsvm2(taus: list, key: str):
    """TSVM_2 as the original loop writes it: full-r padded U_cat, stable sort, eigh whitening."""
    T = len(taus)
    for i, tv in enumerate(taus):
        u, s, v = torch.linalg.svd(tv[key], full_matrices=False)
        if i == 0:
            su, ss, sv = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(v)
        k = int(s.shape[0] * (1 / T))
        su[:, i * k:(i + 1) * k], ss[i * k:(i + 1) * k], sv[i * k:(i + 1) * k, :] = \
            u[:, :k], s[:k], v[:k, :]
    ss, idx = torch.sort(ss, stable=True)
    su, sv = su[:, idx], sv[idx, :]

    def whiten(g):
        lam, q = torch.linalg.eigh(g)
        return q @ torch.diag(1.0 / (torch.sqrt(torch.abs(lam)) + 1e-12)) @ q.mT
    # multi_dot as the original: with a zero-padded column (T·k < r) its 1e12 eigenvalue factor
    # makes the product order visible at 1e-6.
    return torch.linalg.multi_dot((su, whiten(su.mT @ su), torch.diag(ss), whiten(sv @ sv.mT), sv))


def ref_running_mean(taus, key):
    mean = taus[0][key].clone()
    for i, tv in enumerate(taus[1:], start=2):
        mean += (tv[key] - mean) / i
    return mean


def task_vectors(theta0, experts):
    return [{k: e[k] - theta0[k] for k in theta0} for e in experts.values()]


# --- tests -------------------------------------------------------------------------------------

def test_task_arithmetic_and_weight_averaging(models):
    theta0, experts = models
    ptm, _, tvs = ref_flat(theta0, experts)
    assert_state_close(merging.task_arithmetic(theta0, experts, lam=0.3),
                       unflatten(ptm + 0.3 * tvs.sum(0), theta0))
    assert_state_close(merging.weight_averaging(theta0, experts),
                       unflatten(ptm + tvs.sum(0) / len(TASKS), theta0))
    assert_state_close(merging.weight_averaging(theta0, experts, drop_last=True),
                       unflatten(ptm + tvs[:-1].sum(0) / len(TASKS), theta0))


@pytest.mark.parametrize("K", [0.2, 0.05, 1.0])
@pytest.mark.parametrize("merge", ["dis-sum", "dis-mean", "dis-max"])
def test_ties_matches_flattened_reference(models, K, merge):
    theta0, experts = models
    ptm, _, tvs = ref_flat(theta0, experts)
    want = unflatten(ptm + 0.3 * ref_ties(tvs, K, merge), theta0)
    assert_state_close(merging.ties_merging(theta0, experts, k=K, merge=merge, lam=0.3), want)


def test_ties_selected_matches_split_reference(models):
    theta0, experts = models
    selected = merging.ties_selected(theta0, experts, k=0.2)
    _, _, tvs = ref_flat(theta0, experts)
    _, ref_sel = ref_ties_parts(tvs, 0.2)
    for t, task in enumerate(TASKS):
        assert torch.equal(flatten(selected[task]), ref_sel[t])


def test_ties_selected_sum_is_dis_sum(models):
    theta0, experts = models
    selected = merging.ties_selected(theta0, experts, k=0.2)
    merged = merging.ties_delta(theta0, experts, k=0.2, merge="dis-sum")
    for key in merged:
        torch.testing.assert_close(sum(selected[t][key] for t in TASKS), merged[key],
                                   atol=ATOL, rtol=0)


@pytest.mark.parametrize("rescaler", ["code", "paper"])
def test_emr_matches_reference(models, rescaler):
    theta0, experts = models
    uni, masks, rescalers = ref_emr(task_vectors(theta0, experts), paper=rescaler == "paper")
    emr = merging.emr_merging(theta0, experts, rescaler=rescaler)
    torch.testing.assert_close(emr.rescalers, rescalers, atol=1e-6, rtol=1e-6)
    for t, task in enumerate(TASKS):
        want = {k: theta0[k] + uni[k] * masks[k][t] * rescalers[t] for k in theta0}
        assert_state_close(emr.task_state_dict(theta0, task), want)
        assert all(torch.equal(emr.tau_uni[k], uni[k]) for k in uni)
        assert all(torch.equal(emr.task_delta(t)[k] != 0, (uni[k] * masks[k][t]) != 0) for k in uni)


@pytest.mark.parametrize("method", ["TSVM", "TSVM_2"])
def test_tsv_merge_matches_reference(models, method):
    theta0, experts = models
    taus = task_vectors(theta0, experts)
    ref = ref_tsvm if method == "TSVM" else ref_tsvm2
    # TSVM takes its leading triplets from a float64 Gram (more exact than a float32 SVD), so its
    # reference is the same math in float64; TSVM_2 keeps the original's float32 SVD arithmetic,
    # which its ill-conditioned whitening amplifies far beyond 1e-6.
    exact = [{k: v.double() for k, v in tv.items()} for tv in taus] if method == "TSVM" else taus
    want = {}
    for k in theta0:
        svd = theta0[k].ndim == 2 and "text_projection" not in k
        delta = ref(exact, k) if svd else ref_running_mean(taus, k)
        want[k] = theta0[k] + 0.7 * delta.float()
    assert_state_close(merging.tsv_merging(theta0, experts, alpha=0.7, method=method), want)


def test_tsv_compress_matches_reference(models):
    theta0, experts = models
    tsvc = merging.tsv_compress(theta0, experts)
    for t, tv in enumerate(task_vectors(theta0, experts)):
        want = {}
        for k in theta0:
            if tv[k].ndim != 2:
                want[k] = theta0[k] + tv[k]
                continue
            u, s, vh = torch.linalg.svd(tv[k].double(), full_matrices=False)  # the exact math
            r = min(tv[k].shape) // len(TASKS)
            want[k] = theta0[k] + (u[:, :r] @ torch.diag(s[:r]) @ vh[:r, :]).float()
        assert_state_close(tsvc.task_state_dict(theta0, t), want)


@pytest.mark.parametrize("use_ties", [False, True])
def test_tall_masks_and_consensus_match_flattened_reference(models, use_ties):
    theta0, experts = models
    ptm, ft, tvs = ref_flat(theta0, experts)
    mtl = ref_ties(tvs, 0.2, "dis-sum") if use_ties else sum(tvs[t] for t in range(len(TASKS)))
    lams = [0.2, 0.4, 0.5, 0.6]
    tall = merging.tall_masks(theta0, experts, lams, use_ties=use_ties)
    torch.testing.assert_close(flatten(tall.tau_mtl), mtl, atol=ATOL, rtol=0)
    ref_masks = []
    for t, lam in enumerate(lams):
        mask = (ptm - ft[t]).abs() > ((ptm + flatten(tall.tau_mtl)) - ft[t]).abs() * lam
        ref_masks.append(mask)
        assert torch.equal(flatten(tall.mask(t)), mask)
        assert_state_close(tall.task_state_dict(theta0, TASKS[t]),
                           unflatten(ptm + flatten(tall.tau_mtl) * mask, theta0))
    consensus = torch.stack(ref_masks).float().sum(0) >= 2
    assert_state_close(merging.consensus_merging(theta0, tall, alpha=0.4, k=2),
                       unflatten(ptm + 0.4 * (flatten(tall.tau_mtl) * consensus), theta0))


def test_lazy_safetensors_readers_give_identical_results(models, tmp_path):
    theta0, experts = models
    save_file(theta0, str(tmp_path / "zeroshot.safetensors"))
    for task, sd in experts.items():
        save_file(sd, str(tmp_path / f"{task}.safetensors"))
    lazy0 = open_state_dict(str(tmp_path / "zeroshot.safetensors"))
    lazy = {t: open_state_dict(str(tmp_path / f"{t}.safetensors")) for t in TASKS}
    assert not isinstance(lazy0, dict)
    runs = [
        lambda p, e: merging.weight_averaging(p, e),
        lambda p, e: merging.ties_merging(p, e, k=0.2, merge="dis-mean", lam=0.5),
        lambda p, e: merging.emr_merging(p, e).task_state_dict(p, 2),
        lambda p, e: merging.tsv_merging(p, e, method="TSVM"),
        lambda p, e: merging.tsv_compress(p, e).task_state_dict(p, 1),
        lambda p, e: merging.tall_masks(p, e, 0.3).task_state_dict(p, 0),
    ]
    for run in runs:
        got, want = run(lazy0, lazy), run(theta0, experts)
        assert all(torch.equal(got[k], want[k]) for k in want)


def _parts(result) -> dict:
    """Every tensor a merge result holds, by name (state dicts, per-task dicts, compact results)."""
    if isinstance(result, merging.EMRMerged):
        return {**{f"uni/{k}": v for k, v in result.tau_uni.items()},
                **{f"mask/{k}": v for k, v in result.masks.items()}, "rescalers": result.rescalers}
    if isinstance(result, merging.TallMasks):
        return {**{f"mtl/{k}": v for k, v in result.tau_mtl.items()},
                **{f"mask/{k}": v for k, v in result.masks.items()}}
    if all(isinstance(v, dict) for v in result.values()):
        return {f"{t}/{k}": v for t, sd in result.items() for k, v in sd.items()}
    return dict(result)


CHUNKED = {
    "wa": lambda p, e: merging.weight_averaging(p, e),
    "ties dis-sum": lambda p, e: merging.ties_merging(p, e, k=0.2, merge="dis-sum", lam=0.3),
    "ties dis-mean": lambda p, e: merging.ties_merging(p, e, k=0.1, merge="dis-mean", lam=0.5),
    "ties dis-max": lambda p, e: merging.ties_merging(p, e, k=0.3, merge="dis-max", lam=0.5),
    "ties selected": lambda p, e: merging.ties_selected(p, e, k=0.2),
    "emr code": lambda p, e: merging.emr_merging(p, e),
    "emr paper": lambda p, e: merging.emr_merging(p, e, rescaler="paper"),
    "tall": lambda p, e: merging.tall_masks(p, e, [0.2, 0.3, 0.5, 0.6], use_ties=True),
    "consensus": lambda p, e: merging.consensus_merging(p, merging.tall_masks(p, e, 0.4), 0.7),
}


@pytest.mark.parametrize("name", sorted(CHUNKED))
def test_chunked_keys_give_the_whole_key_results(models, tmp_path, monkeypatch, name):
    # Large keys are merged in flat chunks; here every key of the tiny model is cut into chunks
    # of 1000 elements (and a ragged last one) and read back from files chunk by chunk.
    from taskmerge.merging import task_vectors
    theta0, experts = models
    want = _parts(CHUNKED[name](theta0, experts))
    save_file(theta0, str(tmp_path / "zeroshot.safetensors"))
    for task, sd in experts.items():
        save_file(sd, str(tmp_path / f"{task}.safetensors"))
    lazy0 = open_state_dict(str(tmp_path / "zeroshot.safetensors"))
    lazy = {t: open_state_dict(str(tmp_path / f"{t}.safetensors")) for t in TASKS}
    monkeypatch.setattr(task_vectors, "CHUNK", 1000)
    spans = list(task_vectors.chunks(theta0["model.visual.proj"].numel()))
    assert len(spans) == 17 and spans[-1] == (16000, 16384)
    got = _parts(CHUNKED[name](lazy0, lazy))
    assert set(got) == set(want)
    for k in want:
        if k == "rescalers":  # sums of chunk sums: the same up to float64 rounding
            torch.testing.assert_close(got[k], want[k], rtol=1e-6, atol=0)
        else:
            assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


def test_a_lazy_reader_reads_any_flat_span(models, tmp_path):
    theta0, _ = models
    save_file(theta0, str(tmp_path / "zeroshot.safetensors"))
    lazy0 = open_state_dict(str(tmp_path / "zeroshot.safetensors"))
    w = theta0["model.visual.proj"]
    for start, stop in [(0, 0), (0, 1), (5, 77), (w.numel() - 3, w.numel()), (0, w.numel())]:
        assert torch.equal(lazy0.read_flat("model.visual.proj", start, stop), w.reshape(-1)[start:stop])
    with pytest.raises(IndexError, match="model.visual.proj"):
        lazy0.read_flat("model.visual.proj", 0, w.numel() + 1)
