"""Bad checkpoints, heads and merges are refused before any work, with one InputError naming the file
(or the method and its coefficient) — not a raw torch error, and not accuracies of a broken model."""
import os

import pytest
import torch

from taskmerge.adaptive.adamerging_coefficients import CoefficientTable
from taskmerge.runs.data_free import run_data_free, run_single_task_eval
from taskmerge.storage.errors import InputError

from script_variables import config_from as _config

MODEL = "taskmerge-tiny-micro"


@pytest.fixture
def bench(private_micro, tmp_path):
    """A private copy of the micro benchmark's checkpoints (to break), on the shared data."""
    ckpt, data, folder = private_micro
    config = {"model_name": MODEL, "checkpoint_dir": ckpt, "data_location": data,
              "tasks": [], "log_dir": str(tmp_path / "logs"), "save_dir": str(tmp_path / "merged"),
              "resume_dir": "", "batch_size": 128, "seed": 0}
    return config, folder


def _edit(path, change):
    sd = torch.load(path, weights_only=True)
    change(sd)
    torch.save(sd, path)


def _drop_ln_post_bias(sd):
    del sd["model.visual.ln_post.bias"]


def _cut_ln_post_bias(sd):
    sd["model.visual.ln_post.bias"] = sd["model.visual.ln_post.bias"][:-1].clone()


def _nan_proj(sd):
    sd["model.visual.proj"][0, 0] = float("nan")


@pytest.mark.parametrize("file,change,says", [
    ("Digits/finetuned.pt", _drop_ln_post_bias, "keys do not match"),
    ("Digits/finetuned.pt", _cut_ln_post_bias, "has shape"),
    ("zeroshot.pt", _drop_ln_post_bias, "keys do not match"),
    ("Fashion/finetuned.pt", _nan_proj, "NaN/Inf"),
])
def test_broken_checkpoint_is_refused_naming_its_file_before_any_evaluation(bench, file, change, says):
    config, folder = bench
    _edit(folder / file, change)
    with pytest.raises(InputError) as e:
        run_data_free(_config("main_TaskArithmetic.py", {**config, "scaling_coef": 0.3}), script="ta.py")
    assert str(folder / file) in str(e.value) and says in str(e.value)
    assert not os.path.exists(folder / "individual_accuracies_test.json")  # nothing evaluated first


def _rows(n):
    return lambda sd: sd.update(weight=sd["weight"][:n].clone(), bias=sd["bias"][:n].clone())


def _widen(sd):
    sd["weight"] = torch.cat([sd["weight"], sd["weight"][:, :1]], dim=1)


def _nan_head(sd):
    sd["weight"][3, 2] = float("nan")


@pytest.mark.parametrize("change,says", [
    (_rows(7), "7 classes but the task has 10"),
    (_widen, "features but the encoder gives"),
    (_nan_head, "NaN/Inf"),
])
def test_head_that_does_not_fit_its_task_or_encoder_is_refused(bench, change, says):
    config, folder = bench
    _edit(folder / "head_Animals.pt", change)
    with pytest.raises(InputError) as e:
        run_single_task_eval(_config("eval_single_task.py", {**config, "split": "test"}),
                         script="eval_single_task.py")
    assert str(folder / "head_Animals.pt") in str(e.value) and says in str(e.value)


def test_single_task_eval_refuses_nan_experts(bench):
    config, folder = bench
    _edit(folder / "LowResDigits" / "finetuned.pt", _nan_proj)
    with pytest.raises(InputError, match="LowResDigits.*NaN/Inf"):
        run_single_task_eval(_config("eval_single_task.py", {**config, "split": "test"}),
                         script="eval_single_task.py")


def _near_float32_max(sd):
    sd["model.visual.proj"][0, 0] = 3e38


def test_non_finite_merge_is_neither_saved_nor_evaluated(bench):
    config, folder = bench
    with pytest.raises(InputError, match="scaling_coef=inf.*expected a float; finite"):
        run_data_free(_config("main_TaskArithmetic.py", {**config, "scaling_coef": 1e999}), script="ta.py")
    # finite experts and a finite λ can still overflow float32 in Σ τ: the merge itself is checked
    for task in ("Digits", "Fashion"):
        _edit(folder / task / "finetuned.pt", _near_float32_max)
    with pytest.raises(InputError) as e:
        run_data_free(_config("main_TaskArithmetic.py", {**config, "scaling_coef": 0.3}), script="ta.py")
    assert "task_arithmetic" in str(e.value) and "scaling_coef=0.3" in str(e.value)
    saved = os.path.join(config["save_dir"], MODEL)
    assert not os.path.exists(saved) or os.listdir(saved) == []


def test_nan_adamerging_coefficients_are_refused():
    with pytest.raises(InputError, match="coef.json: the coefficients hold NaN"):
        CoefficientTable("tw_adamerging", MODEL, ["A", "B"], [[1.0, 0.3, float("nan")]], None,
                         source="coef.json")
