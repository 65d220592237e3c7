import os

import open_clip
import pytest
import torch
import torch.nn.functional as F
from training_toys import apply_task_vectors, expert_encoders, single_thread, toy_setup  # noqa: F401

from taskmerge.adaptive.adaptation_data import TaskImages
from taskmerge.adaptive.feature_cache import (FeatureCache, base_and_expert_features, encoder_features,
                                              expert_features)
from taskmerge.adaptive.representation_bias import (bias_profile, bias_report, draw_representation_bias,
                                                    mean_l1)
from taskmerge.adaptive.surgery import (SurgeryConfig, adam_step, online_eval_points, train_surgery,
                                        train_surgery_online)
from taskmerge.adaptive.surgery_modules import (SurgeryAdapter, deep_forward, encoder_sizes, make_adapters,
                                                make_deep_adapters)
from taskmerge.adaptive.surgery_v2 import deep_surgery_pass, train_surgery_v2
from taskmerge.models.encoders import ImageEncoder


@pytest.fixture(scope="module")
def toy():
    """Base = TA(0.3) of 3 fake experts; features of base and experts computed once."""
    encoder, pre, taus, tasks, images, heads = toy_setup(n=20, noise=0.05)
    base = encoder
    base.load_state_dict(apply_task_vectors(pre, taus, [0.3] * len(tasks)))
    experts = dict(zip(tasks, expert_encoders(pre, taus)))
    base_feats = {t: encoder_features(base, images[t], batch_size=8) for t in tasks}
    expert_feats = {t: encoder_features(experts[t], images[t], batch_size=8) for t in tasks}
    labels = {t: images[t].labels for t in tasks}
    return base, experts, tasks, images, heads, base_feats, expert_feats, labels


def _final(feats):
    return {t: f["final"] for t, f in feats.items()}


def test_adapter_starts_as_identity_and_step0_is_the_base(toy):
    base, experts, tasks, images, heads, bf, ef, labels = toy
    z = torch.randn(7, 128)
    assert torch.equal(SurgeryAdapter(128, 16)(z), z)
    config = SurgeryConfig(rank=4, iterations=0)
    result = train_surgery(tasks, _final(bf), _final(ef), labels, heads, config)
    for t in tasks:
        with torch.no_grad():
            base_acc = (heads[t](base(images[t].images)).argmax(1) == labels[t]).sum().item() / len(labels[t])
        assert result.history[0]["step"] == 0 and result.history[0]["accs"][t] == base_acc


def test_surgery_v1_reduces_l1_and_logs_every_eval(toy, tmp_path):
    from taskmerge.runs.reporting import RunLogger
    base, experts, tasks, images, heads, bf, ef, labels = toy
    config = SurgeryConfig(rank=8, iterations=30, lr=1e-2, batch_size=8, eval_every=10)
    logger = RunLogger(str(tmp_path / "log.txt"), {"method": "surgery"}, echo=False)
    result = train_surgery(tasks, bf, ef, labels, heads, config, logger=logger)   # feature dicts
    for t in tasks:
        assert mean_l1(result.corrected[t]["final"], ef[t]["final"]) < mean_l1(bf[t]["final"], ef[t]["final"])
        assert result.corrected[t]["blocks"] is bf[t]["blocks"]      # v1 does not touch the blocks
    assert [h["step"] for h in result.history] == [0, 10, 20, 30]
    assert any("zero_grad_mode=zero" in line for line in logger.lines)
    assert f"Eval: step: 30 dataset: {tasks[1]} ACC: {result.history[-1]['accs'][tasks[1]]}" in logger.lines
    assert len(result.losses) == 30 and result.losses[-1] < result.losses[0]


@pytest.mark.parametrize("mode, moves", [("zero", True), ("none", False)])
def test_zero_grad_modes(mode, moves):
    """torch 1.x semantics ("zero"): after its first use a module keeps a zero .grad and Adam keeps
    moving it while another task trains; torch 2.x ("none"): it stays put."""
    adapters = make_adapters(["A", "B"], dim=6, rank=3, seed=0)
    opt = torch.optim.Adam(adapters.parameters(), lr=1e-2)
    z, target = torch.randn(4, 6), torch.randn(4, 6)
    adam_step(opt, F.l1_loss(adapters["A"](z), target), mode)
    a_after_own_step = [p.detach().clone() for p in adapters["A"].parameters()]
    adam_step(opt, F.l1_loss(adapters["B"](z), target), mode)
    changed = any(not torch.equal(p, q) for p, q in zip(adapters["A"].parameters(), a_after_own_step))
    assert changed == moves


def test_deep_forward_is_the_encoder_forward_and_mixes_no_samples(toy):
    base, experts, tasks, images, heads, bf, ef, labels = toy
    x = images[tasks[0]].images[:5]
    with torch.no_grad():
        hidden, z = deep_forward(base, x)
        assert torch.equal(z, base(x))
        adapters = make_deep_adapters(tasks, base, rank=4, seed=0)[tasks[0]]
        for p in adapters.parameters():        # non-zero `up` so the modules really act
            p.copy_(0.1 * torch.randn_like(p))
        hidden, z = deep_forward(base, x, adapters)
        for i in range(len(x)):
            h_i, z_i = deep_forward(base, x[i:i + 1], adapters)
            torch.testing.assert_close(z_i, z[i:i + 1], rtol=1e-5, atol=1e-5)
            for l in range(len(hidden)):
                torch.testing.assert_close(h_i[l], hidden[l][i:i + 1], rtol=1e-5, atol=1e-5)
        # The check has teeth: SurgeryV2's (L, N, D) permute on a batch-first block mixes samples.
        tokens = torch.randn(5, 65, 128)
        block = base.model.visual.transformer.resblocks[0]
        permuted = block(tokens.permute(1, 0, 2)).permute(1, 0, 2)
        alone = block(tokens[:1].permute(1, 0, 2)).permute(1, 0, 2)
        assert not torch.allclose(permuted[:1], alone, atol=1e-3)


def test_deep_adapter_sizes_follow_the_model():
    clip = open_clip.CLIP(embed_dim=48, vision_cfg={"layers": 2, "width": 64, "patch_size": 8,
                          "image_size": 32, "head_width": 32},
                          text_cfg={"context_length": 8, "vocab_size": 50, "width": 32, "heads": 2, "layers": 1})
    two_block = ImageEncoder(clip).eval()
    for encoder, (w, L, d) in ((two_block, (64, 2, 48)), (toy_setup(num_tasks=1, n=2)[0], (128, 4, 128))):
        assert encoder_sizes(encoder) == (w, L, d)
        r = 4
        adapters = make_deep_adapters(["T"], encoder, rank=r)["T"]
        assert sum(p.numel() for p in adapters.parameters()) == L * 2 * w * r + 2 * d * r
        x = torch.randn(3, 3, 32, 32)
        with torch.no_grad():
            hidden, z = deep_forward(encoder, x, adapters)
            assert len(hidden) == L and hidden[0].shape == (3, w)
            torch.testing.assert_close(z, encoder(x))    # identity at init


@pytest.mark.parametrize("arch, rank, per_task", [("ViT-B-32", 16, 311_296), ("ViT-L-14", 4, 202_752)])
def test_deep_adapter_counts_of_the_real_models(arch, rank, per_task):
    """METHODS.md §2.9: 12 blocks of 768 → 512 (B) and 24 blocks of 1024 → 768 (L/14), not hard-coded."""
    clip = open_clip.create_model(arch + "-quickgelu", pretrained=None, device="meta")
    adapters = make_deep_adapters(["T"], ImageEncoder(clip), rank=rank)["T"]
    assert sum(p.numel() for p in adapters.parameters()) == per_task


def test_expert_feature_cache_is_keyed_atomic_and_reused(toy, tmp_path):
    base, experts, tasks, images, heads, bf, ef, labels = toy
    cache = FeatureCache(str(tmp_path / "cache"))
    calls = []

    def load():
        calls.append(1)
        return experts[tasks[0]]

    kw = dict(model_name="taskmerge-tiny", checkpoint_digest="sha256:aaa", dataset_id=f"{tasks[0]}/test")
    first = expert_features(cache, load, images[tasks[0]], batch_size=8, **kw)
    again = expert_features(cache, load, images[tasks[0]], batch_size=8, **kw)
    assert len(calls) == 1                                     # second call: read from disk
    assert torch.equal(first["final"], again["final"]) and torch.equal(first["blocks"], again["blocks"])
    assert first["blocks"].dtype == torch.float16 and first["blocks"].shape == (4, 20, 128)
    torch.testing.assert_close(first["final"], ef[tasks[0]]["final"])
    expert_features(cache, load, images[tasks[0]], batch_size=8, **{**kw, "checkpoint_digest": "sha256:bbb"})
    assert len(calls) == 2                                     # another checkpoint: another entry
    files = os.listdir(tmp_path / "cache")
    assert len(files) == 2 and all(f.startswith("features_") and f.endswith(".safetensors") for f in files)
    other = TaskImages.from_tensors(images[tasks[0]].images.flip(0), labels[tasks[0]])
    expert_features(cache, load, other, batch_size=8, **kw)    # same name, different images
    assert len(calls) == 3
    # Base and expert from one pass on a miss; on a hit the expert is read, the base recomputed.
    for expected_calls in (4, 4):
        b, e = base_and_expert_features(base, cache, load, images[tasks[0]], batch_size=8,
                                        **{**kw, "checkpoint_digest": "sha256:ccc"})
        assert len(calls) == expected_calls
        assert torch.equal(b["final"], bf[tasks[0]]["final"]) and torch.equal(e["blocks"], first["blocks"])


class Killed(Exception):
    pass


def _killer(at):
    def on_step(step):
        if step == at:
            raise Killed
    return on_step


def test_surgery_v1_resume_is_bit_identical(toy, tmp_path):
    base, experts, tasks, images, heads, bf, ef, labels = toy
    config = SurgeryConfig(rank=4, iterations=7, lr=1e-2, batch_size=4, eval_every=3, checkpoint_every=2)
    args = (tasks, _final(bf), _final(ef), labels, heads, config)
    full = train_surgery(*args, checkpoint_dir=str(tmp_path / "a"))
    with pytest.raises(Killed):
        train_surgery(*args, checkpoint_dir=str(tmp_path / "b"), on_step=_killer(5))
    resumed = train_surgery(*args, checkpoint_dir=str(tmp_path / "b"))
    for (k, p), q in zip(full.adapters.state_dict().items(), resumed.adapters.state_dict().values()):
        assert torch.equal(p, q), k
    assert full.history == resumed.history and full.losses == resumed.losses


def test_online_variant_points_and_resume(toy, tmp_path):
    base, experts, tasks, images, heads, bf, ef, labels = toy
    assert online_eval_points(19887)[:2] == [(0.01, 198), (0.1, 1988)]
    assert [k for _, k in online_eval_points(20)] == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20]
    config = SurgeryConfig(rank=4, lr=1e-2, checkpoint_every=7)
    args = (tasks, _final(bf), _final(ef), labels, heads, config)
    full = train_surgery_online(*args, checkpoint_dir=str(tmp_path / "a"))
    assert [(h["task"], h["step"]) for h in full.history] == \
        [(t, k) for t in tasks for _, k in online_eval_points(20)]
    assert len(full.losses) == 20 * len(tasks)
    with pytest.raises(Killed):
        train_surgery_online(*args, checkpoint_dir=str(tmp_path / "b"), on_step=_killer(31))
    resumed = train_surgery_online(*args, checkpoint_dir=str(tmp_path / "b"))
    for p, q in zip(full.adapters.parameters(), resumed.adapters.parameters()):
        assert torch.equal(p, q)
    assert full.history == resumed.history and full.final_accs == resumed.final_accs


def test_surgery_v2_trains_resumes_and_reduces_bias(toy, tmp_path):
    base, experts, tasks, images, heads, bf, ef, labels = toy
    tasks = tasks[:2]
    config = SurgeryConfig(rank=4, iterations=4, lr=1e-2, batch_size=5, eval_every=2, checkpoint_every=1)
    args = (tasks, base, images, ef, _final(bf), heads, config)
    full = train_surgery_v2(*args, checkpoint_dir=str(tmp_path / "a"))
    assert full.history[0]["prefix"] == "Ref: step 0:" and [h["step"] for h in full.history] == [0, 2, 4]
    for t in tasks:
        assert full.history[0]["accs"][t] == deep_surgery_pass(base, None, images[t], heads[t])
        before, after = bias_profile(bf[t], ef[t]), bias_profile(full.corrected[t], ef[t])
        assert sum(after["blocks"]) + after["final"] < sum(before["blocks"]) + before["final"]
        acc, feats = deep_surgery_pass(base, full.adapters[t], images[t], heads[t], keep_features=True)
        assert acc == full.history[-1]["accs"][t]
        torch.testing.assert_close(feats["final"], full.corrected[t]["final"])
    with pytest.raises(Killed):
        train_surgery_v2(*args, checkpoint_dir=str(tmp_path / "b"), on_step=_killer(3))
    resumed = train_surgery_v2(*args, checkpoint_dir=str(tmp_path / "b"))
    for p, q in zip(full.adapters.parameters(), resumed.adapters.parameters()):
        assert torch.equal(p, q)
    assert full.history == resumed.history and full.losses == resumed.losses


def test_representation_bias_numbers_and_png(toy, tmp_path):
    from PIL import Image
    base, experts, tasks, images, heads, bf, ef, labels = toy
    same = bias_profile(ef[tasks[0]], ef[tasks[0]])
    assert same == {"final": 0.0, "blocks": [0.0] * 4}
    a, b = torch.zeros(3, 2), torch.tensor([[1.0, -1.0], [2.0, 0.0], [0.0, 0.0]])
    assert mean_l1(a, b) == pytest.approx(4 / 6)
    report = bias_report(ef, {"merged": bf, "final only": {t: {"final": bf[t]["final"]} for t in tasks}})
    before = report["per_task"]["merged"]
    assert before[tasks[1]] == bias_profile(bf[tasks[1]], ef[tasks[1]]) and len(before[tasks[1]]["blocks"]) == 4
    assert report["average"]["merged"]["final"] == pytest.approx(sum(p["final"] for p in before.values()) / 3)
    assert "blocks" not in report["average"]["final only"]
    path = str(tmp_path / "bias.png")
    draw_representation_bias(path, report["per_task"],
                             {t: {"expert": ef[t]["final"], "merged": bf[t]["final"]} for t in tasks},
                             title="toy")
    with Image.open(path) as img:
        assert img.format == "PNG" and img.size[0] > 560
