"""Caches (built heads, expert accuracies, learned coefficients, features) live in the model folder
while it is writable, and elsewhere when it is not, so a read-only shared model store can be used."""
import os

import pytest
from script_variables import script_config

from taskmerge.runs.adaptive import run_adamerging
from taskmerge.runs.data_free import run_data_free
from taskmerge.storage import atomic

MODEL = "taskmerge-tiny-micro"


@pytest.fixture
def store(private_micro, tmp_path):
    ckpt, data, folder = private_micro
    return {"model_name": MODEL, "checkpoint_dir": ckpt, "data_location": data,
            "log_dir": str(tmp_path / "logs"), "save_dir": ""}, folder


def _files(folder):
    return sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(folder) for f in fs)


def test_a_read_only_model_folder_puts_the_caches_in_the_user_cache(store, tmp_path, monkeypatch):
    settings, model_dir = store
    monkeypatch.setenv("TASKMERGE_CACHE_DIR", str(tmp_path / "user-cache"))
    real = atomic.write_refusal
    monkeypatch.setattr(atomic, "write_refusal",
                        lambda folder: "read-only file system" if os.path.abspath(folder) == str(model_dir)
                        else real(folder))
    before = _files(model_dir)
    report = run_data_free(script_config("main_TaskArithmetic.py", **settings), script="main_TaskArithmetic.py")
    learned = run_adamerging(script_config("main_AdaMerging.py", **settings, resume_dir="", adamerging_steps=1,
                                           adamerging_eval_every=1, method_name="tw_adamerging"),
                             script="main_AdaMerging.py")
    assert _files(model_dir) == before  # nothing written into the read-only store
    cache = [os.path.join(r) for r, _, fs in os.walk(tmp_path / "user-cache" / "models")
             if "individual_accuracies_test.json" in fs]
    assert len(cache) == 1 and os.path.basename(cache[0]).startswith(MODEL + "-")
    assert learned["coefficients_file"].startswith(cache[0] + os.sep)
    log = open(next(os.path.join(r, f) for r, _, fs in os.walk(settings["log_dir"]) for f in fs
                    if f == report["log"])).read()
    assert f"Caches (built heads, expert accuracies, coefficients, features) go to {cache[0]}" in log
    assert "cannot be written: read-only file system" in log


def test_an_explicit_cache_dir_and_the_default_in_a_writable_folder(store, tmp_path):
    settings, model_dir = store
    run_data_free(script_config("main_WeightAveraging.py", **settings, cache_dir=str(tmp_path / "c")),
                  script="main_WeightAveraging.py")
    assert os.path.exists(tmp_path / "c" / MODEL / "individual_accuracies_test.json")
    assert not os.path.exists(model_dir / "individual_accuracies_test.json")
    run_data_free(script_config("main_WeightAveraging.py", **settings), script="main_WeightAveraging.py")
    assert os.path.exists(model_dir / "individual_accuracies_test.json")


def test_an_unwritable_explicit_cache_dir_is_refused_before_work(store):
    settings, _ = store
    with pytest.raises(atomic.OutputFolderError, match="setting cache_dir="):
        run_data_free(script_config("main_WeightAveraging.py", **settings, cache_dir="/proc/taskmerge-cache"),
                      script="main_WeightAveraging.py")
