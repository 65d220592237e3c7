"""Issue #13's done-when, at tiny size: a tall_masks folder with all 20 tasks (checkpoints, heads and
the released TALL masks, data in tall_masks' folder layouts) and a FusionBench download of 19 (HF CLIP
folders, hub parquet datasets; FusionBench has no EMNIST digits expert) run through the entry
scripts: the single-task evaluation, TALL masks / Consensus and AdaMerging on the first, the other
data-free merges and a Surgery on the second.

The real ViT-B/32 is too large for a test: its architecture is replaced by a tiny one where the run
builds its encoder (runs.setup / runs.adaptive `build_image_encoder`); everything else is the path a
researcher's download takes."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from script_variables import script_config
from tall_trees import make_folders, make_parquet
from test_hf_checkpoints import _randomise, tiny_config

from taskmerge.datasets import registry
from taskmerge.datasets.parquet import HF_SOURCES
from taskmerge.merging.tall_masks import multitask_vector, tall_masks
from taskmerge.models.encoders import TINY_MODEL, ImageEncoder, build_image_encoder
from taskmerge.models.hf_encoders import create_clip_from_config
from taskmerge.runs import adaptive as run_adaptive
from taskmerge.runs import heads as run_heads
from taskmerge.runs import setup as run_setup
from taskmerge.runs.adaptive import run_adamerging, run_surgery
from taskmerge.runs.data_free import run_data_free, run_single_task_eval
from taskmerge.storage.hf_checkpoints import open_clip_config

DATA_FREE = [("main_WeightAveraging.py", {}), ("main_TaskArithmetic.py", {}), ("main_TiesMerging.py", {}),
             ("main_EMRMerging.py", {}), ("main_TSVMerging.py", {"method": "TSVC"}),
             ("main_TallMasks.py", {"method": "tall_mask", "load_mask": True}),
             ("main_TallMasks.py", {"method": "consensus", "load_mask": True, "select_on_val": False})]
# the 2025 records and DARE, on the HF layout (whose q/k/v are fused into in_proj on load)
RECORDS = [("main_IsoMerging.py", {"method": "iso_c", "select_on_val": False}),
           ("main_IsoMerging.py", {"method": "iso_cts", "select_on_val": False}),
           ("main_WUDIMerging.py", {"wudi_steps": 2}), ("main_CARTMerging.py", {}),
           ("main_PCBMerging.py", {}), ("main_TaskArithmetic.py", {"dare_p": 0.3})]
# the data-aware merges read a few training images of each task (the parquet snapshots hold 6)
DATA_AWARE = [("main_FisherMerging.py", {"num_fisher_examples": 4, "fisher_batch_size": 2}),
              ("main_RegMean.py", {"num_regmean_examples": 4}),
              ("main_RegMean.py", {"method": "regmean_plusplus", "num_regmean_examples": 4})]
FUSIONBENCH_TASKS = [t for t in registry.TALL_20 if t != "EMNIST"]  # FusionBench has no EMNIST digits


def _tiny_encoder(build):
    def patched(arch, state_dict=None):
        enc = build()
        if state_dict is not None:
            enc.load_state_dict({k: state_dict[k] for k in enc.state_dict()})
        return enc.eval()
    return patched


@pytest.fixture(scope="module")
def tall_masks_root(tmp_path_factory):
    """checkpoints/ViT-B-32/<Task>Val/nonlinear_*.pt and head_<Task>Val.pt (state dicts), the
    masks in tall_masks/ViT-B-32/TALL_mask_20task.npy, and the 20 tasks' folders."""
    pytest.importorskip("h5py")
    root = tmp_path_factory.mktemp("tall")
    data, ckpt = str(root / "data"), root / "checkpoints" / "ViT-B-32"
    make_folders(data, registry.TALL_20)
    torch.manual_seed(0)
    theta0 = build_image_encoder(TINY_MODEL).state_dict()
    gen = torch.Generator().manual_seed(1)
    experts = {}
    for task in registry.TALL_20:
        experts[task] = {k: v + 0.02 * torch.randn(v.shape, generator=gen) if v.is_floating_point() else v
                         for k, v in theta0.items()}
        os.makedirs(ckpt / f"{task}Val")
        torch.save(experts[task], ckpt / f"{task}Val" / "nonlinear_finetuned.pt")
        counts = len(registry.get_task(task, data, None).classnames)
        head = torch.randn(counts, theta0["model.visual.proj"].shape[1], generator=gen)
        torch.save({"weight": head, "bias": torch.zeros(counts)}, ckpt / f"head_{task}Val.pt")
    torch.save(theta0, ckpt / "MNISTVal" / "nonlinear_zeroshot.pt")
    # the released masks, as tall_masks saves them: packbits over the sorted keys of the state dict
    tau = multitask_vector(theta0, experts)
    tall = tall_masks(theta0, experts, 0.4, tau_mtl=tau)
    released = {t: np.packbits(np.concatenate([
        tall.mask(t)[k].reshape(-1).numpy() if k in tau else np.zeros(theta0[k].numel(), bool)
        for k in sorted(theta0)])) for t in registry.TALL_20}
    os.makedirs(root / "tall_masks" / "ViT-B-32")
    np.save(root / "tall_masks" / "ViT-B-32" / "TALL_mask_20task.npy", released)
    return {"model_name": "ViT-B-32", "checkpoint_dir": str(root / "checkpoints"), "data_location": data,
            "data_format": "folders", "tasks": "TALL20", "log_dir": str(root / "logs"),
            "save_dir": "", "batch_size": 64}


@pytest.fixture(scope="module")
def fusionbench_root(tmp_path_factory):
    """openai/clip-vit-base-patch32 (CLIPModel) and tanganke/clip-vit-base-patch32_<task>
    (CLIPVisionModel) folders as `hf download --local-dir` writes them, the hub parquet datasets."""
    from transformers import CLIPModel, CLIPVisionModel
    root = tmp_path_factory.mktemp("fusionbench")
    data = str(root / "data")
    make_parquet(data, FUSIONBENCH_TASKS)
    clip = CLIPModel(tiny_config("quick_gelu")).eval()
    _randomise(clip, 1)
    clip.save_pretrained(root / "openai" / "clip-vit-base-patch32")
    base = clip.vision_model.state_dict()
    gen = torch.Generator().manual_seed(2)
    for task in FUSIONBENCH_TASKS:
        vision = CLIPVisionModel(clip.config.vision_config).eval()
        tower = getattr(vision, "vision_model", vision)
        tower.load_state_dict({k: v + 0.02 * torch.randn(v.shape, generator=gen) for k, v in base.items()})
        vision.save_pretrained(root / "tanganke" / f"clip-vit-base-patch32_{HF_SOURCES[task].fusionbench}")
    # no heads: the run builds them from FusionBench's class names with the tiny text tower
    with open(root / "openai" / "clip-vit-base-patch32" / "config.json") as f:
        config = open_clip_config(json.load(f))
    return {"model_name": "ViT-B-32", "checkpoint_dir": str(root), "data_location": data,
            "data_format": "parquet", "tasks": FUSIONBENCH_TASKS, "log_dir": str(root / "logs"),
            "save_dir": "", "batch_size": 64}, config


@pytest.fixture
def tiny_tall_arch(monkeypatch):
    patched = _tiny_encoder(lambda: build_image_encoder(TINY_MODEL))
    monkeypatch.setattr(run_setup, "build_image_encoder", patched)
    monkeypatch.setattr(run_adaptive, "build_image_encoder", patched)


def _settings(script, config):
    known = script_config(script).__dataclass_fields__
    return {k: v for k, v in config.items() if k in known}


def _check(report, tasks, family):
    assert report["tasks"] == list(tasks) and report["checkpoint_family"] == family
    assert set(report["accuracy"]) == set(tasks)
    assert all(0.0 <= a <= 1.0 for a in report["accuracy"].values())


def test_tall_masks_folder_of_20_tasks_runs_eval_tall_masks_and_adamerging(tall_masks_root, tiny_tall_arch):
    config = tall_masks_root
    single = run_single_task_eval(script_config("eval_single_task.py", **_settings("eval_single_task.py", config),
                                                split="test"), script="eval_single_task.py")
    assert single["tasks"] == registry.TALL_20
    assert set(single["zeroshot_accuracy"]) == set(single["individual_accuracy"]) == set(registry.TALL_20)
    # the TALL scripts here (with the released masks), the other data-free ones on the FusionBench
    # download below: 20 folder tasks cost ~3 s an evaluation pass on 2 cores
    for script, extra in DATA_FREE[5:] + DATA_AWARE[:2]:   # Fisher, RegMean on the folder layouts' train splits
        report = run_data_free(script_config(script, **_settings(script, config), **extra), script=script)
        _check(report, registry.TALL_20, "tall_masks")
        if extra.get("load_mask"):
            assert report["masks_loaded_from"].endswith(os.path.join("tall_masks", "ViT-B-32",
                                                                     "TALL_mask_20task.npy"))
    ada = run_adamerging(script_config("main_AdaMerging.py", **_settings("main_AdaMerging.py", config),
                                       resume_dir="", method_name="tw_adamerging", adamerging_steps=1,
                                       adamerging_eval_every=1), script="main_AdaMerging.py")
    _check(ada, registry.TALL_20, "tall_masks")
    assert len(ada["coefficients"][0]) == 21


def _tiny_text_tower(monkeypatch, oc_config):
    """The tiny CLIP's text tower (100 ids) builds the heads, with a tokenizer that fits it; the tiny
    config stands in for ViT-B-32's when the download's config.json is compared with it."""
    from test_fusionbench_family import stand_in_backbone
    from test_fusionbench_heads import TinyTokenizer
    stand_in_backbone(monkeypatch, oc_config)
    monkeypatch.setattr(run_heads, "create_clip", lambda arch: create_clip_from_config(oc_config))
    monkeypatch.setattr(run_heads, "get_tokenizer", lambda arch: TinyTokenizer())


def test_fusionbench_download_runs_the_other_merges_and_surgery(fusionbench_root, monkeypatch):
    config, oc_config = fusionbench_root
    patched = _tiny_encoder(lambda: ImageEncoder(create_clip_from_config(oc_config)))
    monkeypatch.setattr(run_setup, "build_image_encoder", patched)
    monkeypatch.setattr(run_adaptive, "build_image_encoder", patched)
    _tiny_text_tower(monkeypatch, oc_config)
    for script, extra in DATA_FREE[:5] + RECORDS + DATA_AWARE:
        report = run_data_free(script_config(script, **_settings(script, config), **extra), script=script)
        _check(report, FUSIONBENCH_TASKS, "fusionbench")
        if script in ("main_FisherMerging.py", "main_RegMean.py"):   # the keys FusionBench merges
            assert report["key_set"] == "vision_model"
    surgery = run_surgery(script_config("main_TaskArithmetic_with_surgery.py",
                                        **_settings("main_TaskArithmetic_with_surgery.py", config),
                                        resume_dir="", iterations=1, eval_iterations=1, rank=2),
                          script="main_TaskArithmetic_with_surgery.py")
    _check(surgery, FUSIONBENCH_TASKS, "fusionbench")


def test_released_masks_are_refused_for_other_families(fusionbench_root, monkeypatch):
    from taskmerge.storage.errors import ConfigError
    config, oc_config = fusionbench_root
    patched = _tiny_encoder(lambda: ImageEncoder(create_clip_from_config(oc_config)))
    monkeypatch.setattr(run_setup, "build_image_encoder", patched)
    _tiny_text_tower(monkeypatch, oc_config)
    with pytest.raises(ConfigError, match="load_mask=True reads the masks released with the tall_masks"):
        run_data_free(script_config("main_TallMasks.py", **{**_settings("main_TallMasks.py", config),
                                                            "tasks": ["Cars", "DTD"]},
                                    method="tall_mask", load_mask=True),
                      script="main_TallMasks.py")
