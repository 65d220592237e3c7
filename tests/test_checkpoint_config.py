"""The checkpoint says what the model is (issue #21 §1): a Hugging Face download whose config.json
has model_name's shapes but another activation or number of heads is built as its config says (the
features are transformers' own), one whose shapes are another model's is refused naming the fields,
and the checkpoints are validated before the heads' text tower is loaded into the architecture."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_fusionbench_family import stand_in_backbone
from test_hf_checkpoints import _randomise, tiny_config
from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

from taskmerge.models.encoders import backbone_of
from taskmerge.models.tokenizers import tokenizer_identity
from taskmerge.runs import heads as run_heads
from taskmerge.runs import setup as run_setup
from taskmerge.storage.checkpoints import CheckpointError
from taskmerge.storage.errors import InputError
from taskmerge.storage.hf_checkpoints import open_clip_config

REFERENCE = open_clip_config(CLIPConfig(**tiny_config("quick_gelu").to_dict()).to_dict())  # 2 heads


def _config(act="quick_gelu", heads=2, text_act=None, hidden=32):
    config = tiny_config(act).to_dict()
    config["vision_config"].update(num_attention_heads=heads, hidden_act=act, hidden_size=hidden)
    config["text_config"].update(num_attention_heads=heads, hidden_act=text_act or act)
    return CLIPConfig(**{k: config[k] for k in ("vision_config", "text_config", "projection_dim")})


def _download(root, config):
    """`hf download --local-dir` trees of the pre-trained CLIPModel and a Cars expert."""
    clip = CLIPModel(config).eval()
    _randomise(clip, 1)
    clip.save_pretrained(root / "openai" / "clip-vit-base-patch32")
    vision = CLIPVisionModel(config.vision_config).eval()
    _randomise(vision, 2)
    vision.save_pretrained(root / "tanganke" / "clip-vit-base-patch32_stanford-cars")
    return clip, vision


def _setup(root):
    return run_setup.resolve_setup("ViT-B-32", str(root), str(root / "data"), ["Cars"], "parquet")


@pytest.mark.parametrize("act,heads,arch", [("gelu", 2, "ViT-B-32+gelu"),
                                            ("quick_gelu", 4, "ViT-B-32+heads4+text_heads4"),
                                            ("gelu", 4, "ViT-B-32+gelu+heads4+text_heads4")])
def test_a_same_shape_checkpoint_is_built_from_its_config(tmp_path, monkeypatch, act, heads, arch):
    """Both towers run as transformers runs the folder: image features of θ0 and of an expert, and
    the text features the heads are built from."""
    stand_in_backbone(monkeypatch, REFERENCE)
    clip, vision = _download(tmp_path, _config(act, heads))
    setup = _setup(tmp_path)
    assert setup.arch == arch and setup.describe()["arch"] == arch and backbone_of(arch) == "ViT-B-32"
    assert tokenizer_identity(arch) == tokenizer_identity("ViT-B-32")  # a head's key does not change
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ckpt = setup.checkpoints
    with torch.no_grad():
        base = run_setup.encoder_for(setup, ckpt.pretrained())(images)
        torch.testing.assert_close(base, clip.get_image_features(pixel_values=images).pooler_output,
                                   atol=1e-5, rtol=0)
        expert = run_setup.encoder_for(setup, ckpt.finetuned("Cars"))(images)
        torch.testing.assert_close(expert, clip.visual_projection(vision(pixel_values=images).pooler_output),
                                   atol=1e-5, rtol=0)
        ours = run_heads._pretrained_clip(setup, "Cars", run_heads.text_tower_path(setup))
        ids = torch.randint(2, 98, (2, 16), generator=torch.Generator().manual_seed(1))
        ids[:, 9] = 99  # the end-of-text id, the vocabulary's largest: both models pool there
        torch.testing.assert_close(ours.encode_text(ids), clip.get_text_features(input_ids=ids).pooler_output,
                                   atol=1e-5, rtol=0)


def test_the_backbone_s_own_config_keeps_its_name(tmp_path, monkeypatch):
    stand_in_backbone(monkeypatch, REFERENCE)
    _download(tmp_path, _config())
    assert _setup(tmp_path).arch == "ViT-B-32"


def test_a_checkpoint_of_other_shapes_is_refused_naming_the_fields(tmp_path, monkeypatch):
    _download(tmp_path, _config(hidden=48))
    # against the real ViT-B-32: every shape differs
    with pytest.raises(CheckpointError, match=r"clip-vit-base-patch32/config\.json: describes another model "
                                              r"than model_name='ViT-B-32': embed_dim 24 \(model_name's "
                                              r"512\); vision image_size 32 \(model_name's 224\)"):
        _setup(tmp_path)
    stand_in_backbone(monkeypatch, REFERENCE)
    with pytest.raises(CheckpointError, match=r"vision width 48 \(model_name's 32\); vision mlp_ratio .*No backbone taskmerge builds"):
        _setup(tmp_path)
    # where another backbone has these shapes, the error names it
    stand_in_backbone(monkeypatch, open_clip_config(CLIPConfig(**_config(hidden=48).to_dict()).to_dict()),
                      "ViT-B-16")
    with pytest.raises(CheckpointError, match=r"Set model_name='ViT-B-16'"):
        _setup(tmp_path)


def test_a_text_tower_open_clip_cannot_build_is_refused_before_any_work(tmp_path, monkeypatch):
    stand_in_backbone(monkeypatch, REFERENCE)
    _download(tmp_path, _config("quick_gelu", text_act="gelu"))
    with pytest.raises(CheckpointError, match=r"config\.json: the text tower's hidden_act: text 'gelu', "
                                              r"vision 'quick_gelu'"):
        _setup(tmp_path)


# --- the file layouts: the checkpoints are validated first, a text tower of another model is named ---
MODEL = "taskmerge-tiny-micro"


@pytest.fixture
def bench(private_micro, tmp_path):
    ckpt, data, folder = private_micro
    config = {"model_name": MODEL, "checkpoint_dir": ckpt, "data_location": data,
              "tasks": [], "log_dir": str(tmp_path / "logs"), "save_dir": "", "resume_dir": "",
              "batch_size": 128, "seed": 0}
    return config, folder


def _text_tower_of_another_model(folder):
    """The heads' text tower replaced by one whose text transformer is narrower, and a head to build."""
    path = str(folder / "clip_pretrained.safetensors")
    state = load_file(path)
    key = next(k for k in state if k.startswith("transformer.") and k.endswith("ln_1.weight"))
    state[key] = state[key][:-1].clone()
    save_file(state, path)
    head = next(f for f in os.listdir(folder) if f.startswith("head_") and f.endswith(".pt"))
    os.remove(folder / head)
    return path, key


def _as_found(config, monkeypatch):
    """The run's setup as resolve_setup finds the copied folder, without the embedded build's own
    check of its manifest (which would rebuild the files this test breaks)."""
    from taskmerge.runs import data_free
    from taskmerge.storage.checkpoints import CheckpointSet
    checkpoints = CheckpointSet.discover(config["checkpoint_dir"], MODEL, ["Digits", "Fashion"])
    setup = run_setup.Setup(MODEL, "taskmerge-tiny", checkpoints, ["Digits", "Fashion"],
                            config["data_location"], True, micro=True)
    monkeypatch.setattr(data_free, "resolve_setup", lambda *a, **k: setup)
    return setup


def test_a_text_tower_of_another_model_is_named_not_a_raw_runtime_error(bench, monkeypatch):
    config, folder = bench
    path, key = _text_tower_of_another_model(folder)
    setup = _as_found(config, monkeypatch)
    with pytest.raises(InputError, match=rf"clip_pretrained\.safetensors: key '{key}' has shape \(127,\), "
                                         rf"the model expects \(128,\)"):
        run_heads.load_heads(setup, log=lambda line: None)


def test_checkpoints_are_validated_before_the_heads_are_built(bench, monkeypatch):
    from script_variables import config_from
    from taskmerge.runs.data_free import run_data_free
    config, folder = bench
    _text_tower_of_another_model(folder)
    _as_found(config, monkeypatch)
    sd = torch.load(folder / "zeroshot.pt", weights_only=True)
    del sd["model.visual.ln_post.bias"]
    torch.save(sd, folder / "zeroshot.pt")
    with pytest.raises(InputError, match=r"zeroshot\.pt: keys do not match the image encoder"):
        run_data_free(config_from("main_TaskArithmetic.py", {**config, "scaling_coef": 0.3}), script="ta.py")
