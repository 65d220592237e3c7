"""Hugging Face CLIP checkpoints (FusionBench's family): the conversion is checked by the forward.

Tiny random CLIPs are built with transformers itself (a test dependency, nothing is downloaded),
saved with `save_pretrained`, read back through storage/hf_checkpoints.py and compared with
transformers' own image features.
"""
from __future__ import annotations

import ast
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

from taskmerge.merging.task_arithmetic import task_arithmetic
from taskmerge.models.encoders import build_image_encoder
from taskmerge.models.hf_encoders import (build_hf_image_encoder, create_clip_from_config,
                                          known_model_name)
from taskmerge.storage.hf_checkpoints import (find_model_folder, image_encoder_recipe, load_hf_clip,
                                              load_hf_image_encoder, open_clip_config,
                                              read_hf_checkpoint, resolve_model_folder)
from taskmerge.storage.safe_pickle import CheckpointError

TOL = 1e-5


def tiny_config(hidden_act: str) -> CLIPConfig:
    return CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, vocab_size=100, max_position_embeddings=16,
                         hidden_act=hidden_act, bos_token_id=98, eos_token_id=99, pad_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, image_size=32, patch_size=8, hidden_act=hidden_act),
        projection_dim=24)


def _randomise(model: torch.nn.Module, seed: int) -> None:
    # transformers initialises layer norms to ones/zeros and biases to zero; random values make a
    # swapped or dropped tensor visible in the features.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def clip_folder(request, tmp_path_factory):
    torch.manual_seed(0)
    model = CLIPModel(tiny_config(request.param)).eval()
    _randomise(model, 1)
    folder = tmp_path_factory.mktemp(f"clip-{request.param}")
    model.save_pretrained(folder)
    return str(folder), model


@pytest.fixture(scope="module")
def images():
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))


@pytest.fixture(scope="module")
def expert_folder(clip_folder, tmp_path_factory):
    """A CLIPVisionModel (transformers 5.x layout) of the same backbone, other weights."""
    _, clip = clip_folder
    vision = CLIPVisionModel(clip.config.vision_config).eval()
    _randomise(vision, 3)
    folder = tmp_path_factory.mktemp("expert")
    vision.save_pretrained(folder)
    return str(folder), vision


def expected_expert_features(clip, vision, images):
    with torch.no_grad():
        return clip.visual_projection(vision(pixel_values=images).pooler_output)


def our_features(folder, images, pretrained=None):
    state, config = load_hf_image_encoder(folder, pretrained)
    encoder, name = build_hf_image_encoder(state, config)
    assert name is None  # a tiny config is built from itself, not mistaken for a real backbone
    with torch.no_grad():
        return encoder(images)


def test_clip_model_features_match_transformers(clip_folder, images):
    folder, clip = clip_folder
    with torch.no_grad():
        expected = clip.get_image_features(pixel_values=images).pooler_output
    ours = our_features(folder, images)
    assert ours.shape == expected.shape == (4, 24)
    assert (ours - expected).abs().max() <= TOL


def test_full_clip_both_towers_match_transformers(clip_folder, images):
    # The zero-shot heads are built from open_clip's CLIP; its text features must be HF's too.
    folder, clip = clip_folder
    state, config = load_hf_clip(folder)
    ours = create_clip_from_config(config)
    assert list(state) == list(ours.state_dict())
    ours.load_state_dict(dict(state), strict=True)
    gen = torch.Generator().manual_seed(4)
    # Full-length sequences ending in the end-of-text token (id 99, the vocabulary's largest, as
    # 49407 is in CLIP's), placed at different positions: both models pool there.
    ids = torch.randint(2, 98, (3, 16), generator=gen)
    for row, end in enumerate((5, 9, 15)):
        ids[row, end] = 99
    with torch.no_grad():
        expected_text = clip.get_text_features(input_ids=ids).pooler_output
        expected_image = clip.get_image_features(pixel_values=images).pooler_output
        assert (ours.encode_text(ids) - expected_text).abs().max() <= TOL
        assert (ours.encode_image(images) - expected_image).abs().max() <= TOL
    assert torch.equal(state["logit_scale"], clip.logit_scale.detach())


def test_lazy_shapes_and_dtypes_are_the_tensors(clip_folder, expert_folder):
    # Validation and the merges read shapes and dtypes without loading; they must be the truth.
    state, _ = load_hf_image_encoder(expert_folder[0], clip_folder[0])
    assert state.path == read_hf_checkpoint(expert_folder[0]).folder
    for key in state:
        tensor = state[key]
        assert state.shape(key) == tuple(tensor.shape), key
        assert state.dtype(key) == tensor.dtype, key


def test_merges_run_on_converted_checkpoints(clip_folder, expert_folder, images):
    # The point of converting once: the merge math reads HF experts like any other reader.
    folder, clip = clip_folder
    expert, vision = expert_folder
    pretrained, config = load_hf_image_encoder(folder)
    finetuned, _ = load_hf_image_encoder(expert, folder)
    merged = task_arithmetic(pretrained, {"SUN397": finetuned}, lam=1.0)
    encoder, _ = build_hf_image_encoder(merged, config)
    with torch.no_grad():
        ours = encoder(images)
    assert (ours - expected_expert_features(clip, vision, images)).abs().max() <= 1e-4


def test_activation_comes_from_hidden_act(clip_folder, images):
    folder, clip = clip_folder
    state, config = load_hf_image_encoder(folder)
    assert config["quick_gelu"] == (clip.config.vision_config.hidden_act == "quick_gelu")
    flipped = {**config, "quick_gelu": not config["quick_gelu"]}
    encoder, _ = build_hf_image_encoder(state, flipped)
    with torch.no_grad():
        expected = clip.get_image_features(pixel_values=images).pooler_output
        assert (encoder(images) - expected).abs().max() > 1e-3  # the wrong activation shows


def test_vision_model_5x_layout_with_pretrained_projection(clip_folder, expert_folder, images):
    folder, clip = clip_folder
    expert, vision = expert_folder
    keys = load_file(os.path.join(expert, "model.safetensors"))
    assert not any(k.startswith("vision_model.") for k in keys)  # what transformers 5.x writes
    ours = our_features(expert, images, pretrained=folder)
    assert (ours - expected_expert_features(clip, vision, images)).abs().max() <= TOL


def test_expert_takes_text_side_from_pretrained(clip_folder, expert_folder):
    folder, clip = clip_folder
    expert, _ = expert_folder
    state, _ = load_hf_image_encoder(expert, folder)
    assert torch.equal(state["model.text_projection"], clip.text_projection.weight.t())
    assert torch.equal(state["model.visual.proj"], clip.visual_projection.weight.t())
    assert torch.equal(state["model.logit_scale"], clip.logit_scale.detach())
    assert torch.equal(state["model.token_embedding.weight"],
                       clip.text_model.embeddings.token_embedding.weight)


def _write_4x_folder(expert: str, out, weights: str) -> str:
    """The expert as transformers 4.x wrote it: `vision_model.` keys, a config of non-defaults."""
    out.mkdir()
    stored = load_file(os.path.join(expert, "model.safetensors"))
    tensors = {"vision_model." + k: v for k, v in stored.items()}
    tensors["vision_model.embeddings.position_ids"] = torch.arange(17).unsqueeze(0)  # early 4.x
    with open(os.path.join(expert, "config.json")) as f:
        config = json.load(f)
    defaults = {"num_channels": 3, "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
    config = {k: v for k, v in config.items() if defaults.get(k, object()) != v}
    with open(out / "config.json", "w") as f:
        json.dump(config, f)
    if weights == "safetensors":
        save_file(tensors, str(out / "model.safetensors"))
    else:
        torch.save(tensors, str(out / "pytorch_model.bin"))
    return str(out)


@pytest.mark.parametrize("weights", ["safetensors", "pytorch_model.bin"])
def test_vision_model_4x_layout(clip_folder, expert_folder, images, tmp_path, weights):
    folder, clip = clip_folder
    expert, vision = expert_folder
    old = _write_4x_folder(expert, tmp_path / "old", weights)
    ours = our_features(old, images, pretrained=folder)
    assert (ours - expected_expert_features(clip, vision, images)).abs().max() <= TOL


def test_vision_model_with_a_nested_vision_config(clip_folder, expert_folder, images, tmp_path):
    folder, clip = clip_folder
    expert, vision = expert_folder
    out = tmp_path / "nested"
    out.mkdir()
    inner = json.load(open(os.path.join(expert, "config.json")))
    outer = {"architectures": ["CLIPVisionModel"], "model_type": "clip", "vision_config": inner}
    (out / "config.json").write_text(json.dumps(outer))
    (out / "model.safetensors").write_bytes(open(os.path.join(expert, "model.safetensors"), "rb").read())
    ours = our_features(str(out), images, pretrained=folder)
    assert (ours - expected_expert_features(clip, vision, images)).abs().max() <= TOL


def test_sharded_safetensors(clip_folder, images, tmp_path):
    folder, clip = clip_folder
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in shards.items():
        save_file({k: tensors[k] for k in part}, str(tmp_path / name))
    weight_map = {k: name for name, part in shards.items() for k in part}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (tmp_path / "config.json").write_bytes(open(os.path.join(folder, "config.json"), "rb").read())
    with torch.no_grad():
        expected = clip.get_image_features(pixel_values=images).pooler_output
    assert (our_features(str(tmp_path), images) - expected).abs().max() <= TOL


def _sharded_bin(folder, out):
    """`folder`'s weights as transformers writes a large model without safetensors: two
    pytorch_model-0000k-of-00002.bin shards and pytorch_model.bin.index.json."""
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    keys = sorted(tensors)
    shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
    out.mkdir()
    for name, part in shards.items():
        torch.save({k: tensors[k] for k in part}, str(out / name))
    weight_map = {k: name for name, part in shards.items() for k in part}
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (out / "config.json").write_bytes(open(os.path.join(folder, "config.json"), "rb").read())
    return str(out)


def test_sharded_pytorch_bin_is_read_through_the_restricted_unpickler(clip_folder, images, tmp_path,
                                                                     monkeypatch):
    from taskmerge.storage import safe_pickle
    from taskmerge.storage.checkpoints import file_digest
    from taskmerge.storage.hf_checkpoints import weight_files
    folder, clip = clip_folder
    out = _sharded_bin(folder, tmp_path / "sharded")
    read = []
    real = safe_pickle.safe_load
    monkeypatch.setattr(safe_pickle, "safe_load", lambda path: read.append(os.path.basename(path)) or real(path))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load read a .bin shard"))
    with torch.no_grad():
        expected = clip.get_image_features(pixel_values=images).pooler_output
    assert (our_features(out, images) - expected).abs().max() <= TOL
    assert read == ["pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin"]
    assert [os.path.basename(f) for f in weight_files(out)] == [
        "config.json", "pytorch_model.bin.index.json", "pytorch_model-00001-of-00002.bin",
        "pytorch_model-00002-of-00002.bin"]
    before = file_digest(out)
    shard = os.path.join(out, "pytorch_model-00002-of-00002.bin")
    os.truncate(shard, os.path.getsize(shard) - 1)
    assert file_digest(out) != before  # a shard is part of the folder's digest
    with pytest.raises(CheckpointError, match=r"pytorch_model-00002-of-00002\.bin"):
        read_hf_checkpoint(out)


def test_a_sharded_index_naming_other_files_is_refused(clip_folder, tmp_path):
    folder, _ = clip_folder
    out = _sharded_bin(folder, tmp_path / "sharded")
    index = os.path.join(out, "pytorch_model.bin.index.json")
    weight_map = json.load(open(index))["weight_map"]
    json.dump({"weight_map": {**weight_map, "extra": "../elsewhere.bin"}}, open(index, "w"))
    with pytest.raises(CheckpointError, match=r"names shard files outside its folder \(\['\.\./elsewhere\.bin'\]\)"):
        read_hf_checkpoint(out)
    json.dump({"weight_map": {**weight_map, "not.there": "pytorch_model-00001-of-00002.bin"}}, open(index, "w"))
    with pytest.raises(CheckpointError, match=r"names 1 tensors its shards do not hold \(e.g. 'not.there'"):
        read_hf_checkpoint(out)


@pytest.mark.parametrize("section", ["vision_config", "text_config"])
def test_a_config_section_that_is_not_an_object_is_refused(clip_folder, tmp_path, section):
    folder, _ = clip_folder
    config = json.load(open(os.path.join(folder, "config.json")))
    config[section] = [config[section]]
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(open(os.path.join(folder, "model.safetensors"), "rb").read())
    with pytest.raises(CheckpointError, match=rf"config\.json: {section} is a list, expected a JSON object"):
        read_hf_checkpoint(str(tmp_path))


def test_hub_cache_layout(clip_folder, expert_folder, images, tmp_path):
    folder, clip = clip_folder
    expert, vision = expert_folder
    entry = tmp_path / "hub" / "models--tanganke--clip-tiny_sun397"
    (entry / "blobs").mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text("abc123\n")
    (entry / "snapshots" / "old000").mkdir(parents=True)  # an older, incomplete revision
    snapshot = entry / "snapshots" / "abc123"
    snapshot.mkdir()
    for i, name in enumerate(["config.json", "model.safetensors"]):
        blob = entry / "blobs" / f"blob{i}"
        blob.write_bytes(open(os.path.join(expert, name), "rb").read())
        os.symlink(os.path.join("..", "..", "blobs", blob.name), snapshot / name)
    assert resolve_model_folder(str(entry)) == str(snapshot)
    found = find_model_folder(str(tmp_path), "tanganke/clip-tiny_sun397")
    assert found == str(snapshot)
    ours = our_features(found, images, pretrained=folder)
    assert (ours - expected_expert_features(clip, vision, images)).abs().max() <= TOL


def test_local_repo_folder_is_found(clip_folder, tmp_path):
    folder, _ = clip_folder
    local = tmp_path / "openai" / "clip-tiny"
    local.parent.mkdir()
    os.symlink(folder, local)
    assert find_model_folder(str(tmp_path), "openai/clip-tiny") == str(local)


def test_4x_defaults_describe_vit_b_32():
    # transformers 4.x leaves defaults out of config.json; openai/clip-vit-base-patch32's are those
    # defaults, so an almost empty config must still come out as ViT-B/32 with QuickGELU.
    from taskmerge.storage.hf_checkpoints import TEXT_DEFAULTS, VISION_DEFAULTS
    config = {"vision_config": dict(VISION_DEFAULTS), "text_config": dict(TEXT_DEFAULTS),
              "projection_dim": 512}
    assert known_model_name(open_clip_config(config)) == "ViT-B-32"
    large = {"vision_config": {**VISION_DEFAULTS, "hidden_size": 1024, "intermediate_size": 4096,
                               "num_hidden_layers": 24, "num_attention_heads": 16, "patch_size": 14},
             "text_config": {**TEXT_DEFAULTS, "hidden_size": 768, "intermediate_size": 3072,
                             "num_attention_heads": 12}, "projection_dim": 768}
    assert known_model_name(open_clip_config(large)) == "ViT-L-14"
    gelu = {**config, "vision_config": {**VISION_DEFAULTS, "hidden_act": "gelu"}}
    assert known_model_name(open_clip_config(gelu)) is None


def test_recipe_gives_the_158_vit_b_32_keys_in_order():
    from taskmerge.storage.hf_checkpoints import TEXT_DEFAULTS, VISION_DEFAULTS
    config = {"vision_config": dict(VISION_DEFAULTS), "text_config": dict(TEXT_DEFAULTS),
              "projection_dim": 512}
    keys = list(image_encoder_recipe(config))
    assert len(keys) == 158
    assert keys == list(build_image_encoder("ViT-B-32").state_dict())


def test_library_does_not_import_transformers():
    # transformers is a test dependency only (open_clip imports it when present, optionally):
    # reading and converting must not need it.
    root = os.path.join(os.path.dirname(__file__), os.pardir, "src", "taskmerge")
    offenders = []
    for folder, _, files in os.walk(root):
        for name in (f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            for node in ast.walk(ast.parse(open(path).read(), path)):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                         [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
                offenders += [f"{path}:{node.lineno}" for n in names if n.split(".")[0] == "transformers"]
    assert offenders == []


# --- refusals ------------------------------------------------------------------------------------

def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        read_hf_checkpoint(str(tmp_path / "nope"))


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        read_hf_checkpoint(str(tmp_path))


def test_config_without_weights(expert_folder, tmp_path):
    expert, _ = expert_folder
    (tmp_path / "config.json").write_bytes(open(os.path.join(expert, "config.json"), "rb").read())
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        read_hf_checkpoint(str(tmp_path))


def test_hub_entry_without_refs_and_two_snapshots(expert_folder, tmp_path):
    expert, _ = expert_folder
    for rev in ("a", "b"):
        (tmp_path / "snapshots" / rev).mkdir(parents=True)
        (tmp_path / "snapshots" / rev / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="without refs/main"):
        resolve_model_folder(str(tmp_path))


def test_refs_main_to_missing_snapshot(tmp_path):
    (tmp_path / "refs").mkdir()
    (tmp_path / "refs" / "main").write_text("deadbeef")
    (tmp_path / "snapshots").mkdir()
    with pytest.raises(CheckpointError, match="deadbeef"):
        resolve_model_folder(str(tmp_path))


def test_repo_not_found_names_the_download(tmp_path):
    with pytest.raises(CheckpointError, match="hf download tanganke/x"):
        find_model_folder(str(tmp_path), "tanganke/x")


def _copy_with_config(expert: str, out, **changes) -> str:
    out.mkdir()
    config = json.load(open(os.path.join(expert, "config.json")))
    config.update(changes)
    (out / "config.json").write_text(json.dumps(config))
    (out / "model.safetensors").write_bytes(open(os.path.join(expert, "model.safetensors"), "rb").read())
    return str(out)


def test_unsupported_activation(expert_folder, tmp_path):
    folder = _copy_with_config(expert_folder[0], tmp_path / "m", hidden_act="gelu_new")
    with pytest.raises(CheckpointError, match="hidden_act 'gelu_new'"):
        read_hf_checkpoint(folder)


def test_other_architecture(expert_folder, tmp_path):
    folder = _copy_with_config(expert_folder[0], tmp_path / "m", architectures=["ViTModel"],
                               model_type="vit")
    with pytest.raises(CheckpointError, match="ViTModel"):
        read_hf_checkpoint(folder)


def test_vision_model_has_no_text_tower(expert_folder):
    with pytest.raises(CheckpointError, match="no text tower"):
        load_hf_clip(expert_folder[0])


def test_vision_model_needs_pretrained(expert_folder):
    with pytest.raises(CheckpointError, match="pass the pre-trained CLIPModel"):
        load_hf_image_encoder(expert_folder[0])


def test_pretrained_must_be_clip_model(expert_folder):
    with pytest.raises(CheckpointError, match="must be a full CLIPModel"):
        load_hf_image_encoder(expert_folder[0], expert_folder[0])


def test_expert_of_another_backbone(clip_folder, expert_folder, tmp_path):
    folder = _copy_with_config(expert_folder[0], tmp_path / "m", patch_size=16)
    with pytest.raises(CheckpointError, match="patch_size"):
        load_hf_image_encoder(folder, clip_folder[0])


def test_truncated_weights_name_the_missing_tensors(clip_folder, expert_folder, tmp_path):
    expert, _ = expert_folder
    out = tmp_path / "cut"
    out.mkdir()
    tensors = load_file(os.path.join(expert, "model.safetensors"))
    del tensors["encoder.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_bytes(open(os.path.join(expert, "config.json"), "rb").read())
    with pytest.raises(CheckpointError, match="k_proj"):
        load_hf_image_encoder(str(out), clip_folder[0])
