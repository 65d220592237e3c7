"""The device setting (compute/devices.py) without a GPU: how "auto" and device strings resolve, what
is refused, and that every stage of every script is handed the run's own device object (a stage that
fell back to its "cpu" default would get another object)."""
import os
import shutil

import pytest
import torch
from script_variables import script_config

import taskmerge.runs.adaptive as runs_adaptive
import taskmerge.runs.data_free as runs_data_free
import taskmerge.runs.setup as runs_setup
from taskmerge import merging
from taskmerge.compute.devices import (default_num_workers, default_threads, device_description,
                                       resolve_device, use_tf32)
from taskmerge.runs.adaptive import run_adamerging, run_surgery
from taskmerge.runs.data_free import run_data_free
from taskmerge.storage.errors import ConfigError


@pytest.fixture
def two_gpus(monkeypatch):
    """torch as it is on a machine with two CUDA GPUs (nothing is computed on them)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def test_auto_is_the_cpu_without_a_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_is_this_process_own_gpu(two_gpus, monkeypatch):
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    monkeypatch.setenv("LOCAL_RANK", "1")   # torchrun's second process on this node
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)   # an explicit index is kept


@pytest.mark.parametrize("name,match", [("cuda", "sees no CUDA GPU"), ("cuda:0", "sees no CUDA GPU"),
                                        ("gpu", "not a torch device"), ("", "not a torch device")])
def test_a_device_that_cannot_be_used_is_refused_not_replaced(monkeypatch, name, match):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=match):
        resolve_device(name)


def test_a_gpu_index_past_the_machine_is_refused(two_gpus):
    with pytest.raises(ConfigError, match="2 CUDA device"):
        resolve_device("cuda:2")


def test_loader_workers_come_from_the_cores_of_each_gpu_process(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert default_num_workers(torch.device("cpu"), cpu_count=64) == 0
    assert default_num_workers(torch.device("cuda", 0), cpu_count=16) == 8
    assert default_num_workers(torch.device("cuda", 0), cpu_count=4) == 3
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_num_workers(torch.device("cuda", 0), cpu_count=16) == 3


def test_tf32_is_set_both_ways_and_recorded():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        use_tf32(True)
        assert device_description(torch.device("cpu"))["tf32"] is True
        use_tf32(False)
        info = device_description(torch.device("cpu"))
        assert info["tf32"] is False and not torch.backends.cudnn.allow_tf32
        assert info["torch"] == torch.__version__ and info["gpu"] is None and info["device"] == "cpu"
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


class DeviceSpy:
    """Resolves every device setting to a fresh torch.device("cpu") object and checks, by identity,
    that each stage receives the one resolved for the run (or for merge_device)."""

    def __init__(self, monkeypatch):
        self.resolved, self.calls = [], {}
        self.monkeypatch = monkeypatch
        monkeypatch.setattr(runs_data_free, "resolve_device", self._resolve)
        # the methods that choose a merge device resolve it in their declarations (runs/methods/)
        from taskmerge.runs.methods import iso_merging, tsv_merging
        for module in (iso_merging, tsv_merging):
            monkeypatch.setattr(module, "resolve_device", self._resolve)

    def _resolve(self, name):
        device = torch.device("cpu")
        self.resolved.append(device)
        return device

    def wrap(self, module, name, where="device", modules=()):
        original = getattr(module, name)

        def spy(*args, **kwargs):
            device = kwargs.get(where)
            assert device is not None and any(device is d for d in self.resolved), \
                f"{name} got device={device!r}, not the run's"
            for m in modules:
                held = args[m] if isinstance(m, int) else kwargs[m]
                for mod in (held.values() if isinstance(held, dict) else [held]):
                    assert all(p.device == device for p in mod.parameters()), name
            self.calls[name] = self.calls.get(name, 0) + 1
            return original(*args, **kwargs)

        self.monkeypatch.setattr(module, name, spy)


@pytest.fixture
def config(micro_benchmark, tmp_path):
    """A copy of the micro benchmark, whose files a test may remove."""
    ckpt, data = micro_benchmark
    copy = tmp_path / "checkpoints"
    shutil.copytree(ckpt, copy)
    return {"model_name": "taskmerge-tiny-micro", "checkpoint_dir": str(copy), "data_location": data,
            "log_dir": str(tmp_path / "logs"), "save_dir": ""}


def test_every_data_free_stage_gets_the_run_device(config, monkeypatch):
    spy = DeviceSpy(monkeypatch)
    spy.wrap(runs_setup, "evaluate")
    from taskmerge.runs.methods import tall_masks
    spy.wrap(tall_masks, "evaluate")  # each task's TALL λ, chosen on its <Task>Val split
    spy.wrap(merging, "tsv_delta")
    run_data_free(script_config("main_TallMasks.py", **config, method="tall_mask"), script="tall.py")
    run_data_free(script_config("main_TSVMerging.py", **config, select_on_val=False), script="tsv.py")
    assert set(spy.calls) == {"evaluate", "tsv_delta"}


def test_a_head_missing_from_the_cache_is_built_on_the_run_device(config, monkeypatch):
    spy = DeviceSpy(monkeypatch)
    from taskmerge.runs import heads as runs_heads
    spy.wrap(runs_heads, "build_zeroshot_head", modules=[0])
    setup = runs_setup.resolve_setup(config["model_name"], config["checkpoint_dir"], config["data_location"])
    setup.device = runs_data_free.resolve_device("cpu")
    os.remove(setup.checkpoints.head_path(setup.tasks[0]))
    heads = runs_heads.load_heads(setup)
    assert spy.calls == {"build_zeroshot_head": 1}
    assert all(p.device == setup.device for h in heads.values() for p in h.parameters())


def test_every_adaptive_stage_gets_the_run_device(config, monkeypatch):
    spy = DeviceSpy(monkeypatch)
    spy.wrap(runs_setup, "evaluate")
    spy.wrap(runs_adaptive, "MergedEncoder")
    spy.wrap(runs_adaptive, "train_adamerging", modules=[0])
    spy.wrap(runs_adaptive, "base_and_expert_features")
    for trainer in ("train_surgery", "train_surgery_v2", "train_surgery_online"):
        spy.wrap(runs_adaptive, trainer)
    run_adamerging(script_config("main_AdaMerging.py", **config, resume_dir="", method_name="tw_adamerging",
                                 coefficients="learn", adamerging_steps=1), script="ada.py")
    for surgery, online in (("v1", False), ("v2", False), ("v1", True)):
        run_surgery(script_config("main_TaskArithmetic_with_surgery.py", **config, resume_dir="",
                                  surgery=surgery, online=online, iterations=1, eval_iterations=1,
                                  feature_cache=""), script="surgery.py")
    assert set(spy.calls) == {"evaluate", "MergedEncoder", "train_adamerging", "base_and_expert_features",
                              "train_surgery", "train_surgery_v2", "train_surgery_online"}


def test_rank_auto_is_the_originals_per_model():
    assert runs_adaptive.surgery_rank("auto", "v2", "ViT-L-14") == 4
    assert runs_adaptive.surgery_rank("auto", "v2", "ViT-B-32") == 16
    assert runs_adaptive.surgery_rank("auto", "v2", "ViT-B-16") == 16
    assert runs_adaptive.surgery_rank("auto", "v1", "ViT-L-14") == 16
    assert runs_adaptive.surgery_rank(304, "v1", "ViT-B-32") == 304


def test_the_report_records_where_it_computed(config):
    report = run_data_free(script_config("main_WeightAveraging.py", **config), script="wa.py")
    assert report["compute"]["device"] == "cpu" and report["compute"]["world_size"] == 1
    assert report["compute"]["tf32"] is False and report["compute"]["torch"] == torch.__version__


def test_auto_threads_are_one_for_the_embedded_model_and_the_cores_for_a_real_one(monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert default_threads(cpu, small_model=True, cpu_count=16) == 1
    assert default_threads(gpu, small_model=True, cpu_count=16) == 1
    assert default_threads(cpu, small_model=False, cpu_count=16) == 16
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert default_threads(cpu, small_model=False, cpu_count=16) == 4
    assert default_threads(cpu, small_model=False, cpu_count=2) == 1


def test_a_run_sets_its_threads_and_records_them(micro_benchmark, tmp_path):
    from script_variables import script_config

    from taskmerge.runs.data_free import run_data_free
    ckpt, data = micro_benchmark
    before = torch.get_num_threads()
    try:
        for threads, expected in (("auto", 1), (2, 2)):
            report = run_data_free(script_config(
                "main_WeightAveraging.py", model_name="taskmerge-tiny-micro", checkpoint_dir=ckpt,
                data_location=data, log_dir=str(tmp_path / "logs"), save_dir="", threads=threads),
                script="main_WeightAveraging.py")
            assert torch.get_num_threads() == expected
            assert report["compute"]["threads"] == expected
    finally:
        torch.set_num_threads(before)
