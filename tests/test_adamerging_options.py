"""AdaMerging's released-alongside options (issue #13 §4): the published coefficients only for
task_vectors' experts, and `clamp` (the originals keep λ in [0, 1]; FusionBench does not)."""
from __future__ import annotations

import os
import shutil
import types

import pytest
from script_variables import script_config

from taskmerge.runs import adaptive
from taskmerge.runs.adaptive import run_adamerging
from taskmerge.storage.errors import ConfigError

MODEL = "taskmerge-tiny-micro"


def fake_run(origin: str, model_name: str = "ViT-B-32"):
    checkpoints = types.SimpleNamespace(origin=origin)
    return types.SimpleNamespace(setup=types.SimpleNamespace(model_name=model_name, tasks=["Cars"],
                                                             checkpoints=checkpoints))


@pytest.mark.parametrize("origin, fits", [("task_vectors", True), ("tall_masks", False),
                                          ("fusionbench", False)])
def test_published_tables_fit_task_vectors_experts_only(origin, fits):
    setup = fake_run(origin).setup
    assert adaptive._published_exists("tw_adamerging", setup) is fits
    assert adaptive._published_exists("tw_adamerging", setup, any_origin=True)
    assert not adaptive._published_exists("tw_adamerging", fake_run(origin, MODEL).setup)


@pytest.mark.parametrize("origin", ["tall_masks", "fusionbench"])
def test_published_on_other_experts_is_refused_naming_why(origin):
    config = types.SimpleNamespace(coefficients="published")
    with pytest.raises(ConfigError, match=f"task_vectors' experts, these are {origin}'s"):
        adaptive.adamerging_encoder(fake_run(origin), "tw_adamerging", config)


@pytest.fixture
def bench(micro_benchmark, tmp_path):
    ckpt, data = micro_benchmark
    shutil.copytree(os.path.join(ckpt, MODEL), tmp_path / "ckpt" / MODEL,
                    ignore=shutil.ignore_patterns("individual_accuracies_*", "adamerging", "feature_cache"))
    return {"model_name": MODEL, "checkpoint_dir": str(tmp_path / "ckpt"), "data_location": data,
            "log_dir": str(tmp_path / "logs"), "save_dir": "", "resume_dir": str(tmp_path / "resume")}


def _learn(config, **kw):
    settings = {**config, "method_name": "lw_adamerging", "adamerging_steps": 2, "adamerging_lr": 0.05,
                "adamerging_eval_every": 2, "checkpoint_every": 1, "prior": 0.0, **kw}
    return run_adamerging(script_config("main_AdaMerging.py", **settings), script="ada.py")


def test_unclamped_coefficients_leave_the_unit_interval_and_are_keyed_apart(bench):
    clamped = _learn(bench, coefficients="learn", clamp=True)
    lams = [v for row in clamped["coefficients"] for v in row[1:]]
    assert all(0.0 <= v <= 1.0 for v in lams)
    free = _learn(bench, coefficients="auto", clamp=False)
    assert free["coefficients_source"] == "learn"  # the clamped run's file is not reused
    lams = [v for row in free["coefficients"] for v in row[1:]]
    assert min(lams) < 0.0 or max(lams) > 1.0
    assert free["coefficients_file"] != clamped["coefficients_file"]
