"""The "fusionbench" checkpoint family: a download root of tiny random transformers CLIP folders
(`openai/clip-vit-base-patch32`, `tanganke/clip-vit-base-patch32_<task>`) found by
`CheckpointSet.discover`, converted, merged, and fingerprinted by its weight files."""
from __future__ import annotations

import os
import shutil

import pytest
import torch
from test_hf_checkpoints import _randomise, tiny_config
from transformers import CLIPModel, CLIPVisionModel

from taskmerge.datasets.parquet import HF_SOURCES
from taskmerge.merging.task_arithmetic import task_arithmetic
from taskmerge.models.hf_encoders import build_hf_image_encoder
from taskmerge.runs.identity import checkpoint_digests
from taskmerge.storage.checkpoints import CheckpointError, CheckpointSet, file_digest
from taskmerge.storage.hf_checkpoints import FUSIONBENCH_TASK_NAMES, open_clip_config

TASKS = ("Cars", "SUN397")


def stand_in_backbone(monkeypatch, config: dict, name: str = "ViT-B-32") -> None:
    """The real ViT-B-32 is too large for a test: `config` (a tiny CLIP's open_clip config, with
    QuickGELU) is what `name` describes when a checkpoint's config.json is compared with it
    (models/hf_encoders.py `checkpoint_arch`)."""
    from taskmerge.models import hf_encoders
    real = hf_encoders.model_config
    monkeypatch.setattr(hf_encoders, "model_config",
                        lambda model: {**config, "quick_gelu": True} if model == name else real(model))


@pytest.fixture(scope="module")
def download_root(tmp_path_factory):
    """`hf download --local-dir` trees: the pre-trained CLIPModel and two CLIPVisionModel experts."""
    root = tmp_path_factory.mktemp("hf")
    clip = CLIPModel(tiny_config("quick_gelu")).eval()
    _randomise(clip, 1)
    clip.save_pretrained(root / "openai" / "clip-vit-base-patch32")
    experts = {}
    for seed, (task, name) in enumerate([("Cars", "stanford-cars"), ("SUN397", "sun397")], start=5):
        vision = CLIPVisionModel(clip.config.vision_config).eval()
        _randomise(vision, seed)
        vision.save_pretrained(root / "tanganke" / f"clip-vit-base-patch32_{name}")
        experts[task] = vision
    return str(root), clip, experts


def test_discover_finds_the_hub_names_of_our_tasks(download_root):
    root, _, _ = download_root
    ckpt = CheckpointSet.discover(root, "ViT-B-32", TASKS)  # auto: fusionbench is tried last
    assert ckpt.family == "fusionbench" and ckpt.origin == "fusionbench"
    assert ckpt.zeroshot_path == os.path.join(root, "openai", "clip-vit-base-patch32")
    expert = os.path.join("tanganke", "clip-vit-base-patch32_stanford-cars")
    assert ckpt.finetuned_path("Cars") == os.path.join(root, expert)
    assert ckpt.head_path("Cars") == os.path.join(root, "ViT-B-32", "head_Cars.pt")


def test_task_arithmetic_merges_the_converted_experts(download_root):
    root, clip, experts = download_root
    ckpt = CheckpointSet.discover(root, "ViT-B-32", TASKS, family="fusionbench")
    ckpt.validate()
    theta0 = ckpt.pretrained()
    merged = task_arithmetic(theta0, {t: ckpt.finetuned(t) for t in TASKS}, 0.5)
    config = open_clip_config(ckpt._hf_base().config)
    encoder, _ = build_hf_image_encoder(merged, config)
    # The merge in transformers' own terms: θ0 + 0.5·Σ(θ_t − θ0) on the vision tower, θ0's projection.
    expected = CLIPVisionModel(clip.config.vision_config).eval()
    tower = lambda m: getattr(m, "vision_model", m)  # noqa: E731 (transformers 5.x has no wrapper)
    base = tower(clip).state_dict()
    tau = {k: sum(tower(e).state_dict()[k] - v for e in experts.values()) for k, v in base.items()}
    tower(expected).load_state_dict({k: v + 0.5 * tau[k] for k, v in base.items()})
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        want = clip.visual_projection(expected(pixel_values=images).pooler_output)
        got = encoder(images)
    assert torch.allclose(got, want, atol=1e-5)
    # Every expert's projection is θ0's, so its task vector there is zero.
    proj = ckpt.finetuned("Cars")["model.visual.proj"]
    assert torch.equal(proj, theta0["model.visual.proj"])


def test_hub_cache_layout_is_found(download_root, tmp_path):
    root, _, _ = download_root
    for repo in ["openai/clip-vit-base-patch32", "tanganke/clip-vit-base-patch32_stanford-cars"]:
        entry = tmp_path / ("models--" + repo.replace("/", "--"))
        shutil.copytree(os.path.join(root, repo), entry / "snapshots" / "abc123")
        (entry / "refs").mkdir()
        (entry / "refs" / "main").write_text("abc123")
    ckpt = CheckpointSet.discover(str(tmp_path), "ViT-B-32", ["Cars"], family="fusionbench")
    assert ckpt.zeroshot_path.endswith(os.path.join("snapshots", "abc123"))
    assert set(ckpt.finetuned("Cars")) == set(ckpt.pretrained())


def test_digest_hashes_the_weight_files(download_root, tmp_path):
    root, _, _ = download_root
    copy = tmp_path / "hf"
    shutil.copytree(root, copy)
    ckpt = CheckpointSet.discover(str(copy), "ViT-B-32", TASKS, family="fusionbench")
    before = checkpoint_digests(ckpt)
    weights = os.path.join(ckpt.finetuned_path("Cars"), "model.safetensors")
    data = bytearray(open(weights, "rb").read())
    data[-1] ^= 1  # the weights changed (their last byte), not the folder
    st = os.stat(weights)
    with open(weights, "wb") as f:
        f.write(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # as `cp -p` would keep it
    after = checkpoint_digests(ckpt)
    assert after["Cars"] != before["Cars"] and after["SUN397"] == before["SUN397"]
    assert after["pretrained"] == before["pretrained"]
    os.remove(weights)
    with pytest.raises(FileNotFoundError):
        file_digest(ckpt.finetuned_path("Cars"))


def test_a_missing_expert_names_the_repo_and_the_download(download_root):
    root, _, _ = download_root
    with pytest.raises(CheckpointError) as e:
        CheckpointSet.discover(root, "ViT-B-32", ["Cars", "DTD"], family="fusionbench")
    assert "tanganke/clip-vit-base-patch32_dtd" in str(e.value) and "hf download" in str(e.value)


def test_emnist_and_unknown_models_are_refused(download_root):
    root, _, _ = download_root
    with pytest.raises(CheckpointError, match="emnist_letters"):
        CheckpointSet.discover(root, "ViT-B-32", ["EMNIST"], family="fusionbench")
    with pytest.raises(CheckpointError, match="no FusionBench checkpoints"):
        CheckpointSet.discover(root, "RN50", ["Cars"], family="fusionbench")


def test_task_names_agree_with_the_parquet_sources():
    assert FUSIONBENCH_TASK_NAMES == {t: s.fusionbench for t, s in HF_SOURCES.items() if t != "EMNIST"}


def test_heads_text_tower_comes_from_the_clip_model_folder(download_root, monkeypatch):
    from taskmerge.models.hf_encoders import create_clip_from_config
    from taskmerge.runs import heads as run_heads
    from taskmerge.runs import setup as run_setup
    root, clip, _ = download_root
    ckpt = CheckpointSet.discover(root, "ViT-B-32", TASKS)
    config = open_clip_config(ckpt._hf_base().config)
    # The real ViT-B-32 is too large for a test: the tiny config stands in for its architecture.
    monkeypatch.setattr(run_heads, "create_clip", lambda arch: create_clip_from_config(config))
    setup = run_setup.Setup("ViT-B-32", "ViT-B-32", ckpt, list(TASKS), str(root), False)
    ours = run_heads._pretrained_clip(setup, "Cars", run_heads.text_tower_path(setup))
    tokens = torch.tensor([[98, 5, 7, 99] + [1] * 12])
    with torch.no_grad():
        want = clip.get_text_features(input_ids=tokens[:, :4])
        got = ours.encode_text(torch.cat([tokens[:, :4], torch.zeros(1, 12, dtype=torch.long)], 1))
    want = getattr(want, "pooler_output", want)
    assert torch.allclose(got, want, atol=1e-5)


def test_digest_of_a_sharded_folder_covers_every_shard(tmp_path):
    from taskmerge.storage.hf_checkpoints import weight_files
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}')
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        (tmp_path / name).write_bytes(b"x" * 10)
    assert [os.path.basename(f) for f in weight_files(str(tmp_path))] == [
        "config.json", "model.safetensors.index.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors"]
    before = file_digest(str(tmp_path))
    (tmp_path / "model-00002-of-00002.safetensors").write_bytes(b"y" * 11)
    assert file_digest(str(tmp_path)) != before
