"""torchrun with 2 gloo processes on the CPU computes what one process computes (compute/distributed.py):
the same accuracies, AdaMerging coefficients (to 1e-6) and Surgery results, with only rank 0 writing,
and a run killed mid-training resumes from rank 0's state."""
import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from script_variables import SRC, script_config

from taskmerge.runs.adaptive import run_adamerging, run_surgery

RANKS = 2


@pytest.fixture(scope="module")
def micro_copy(micro_benchmark, tmp_path_factory):
    """The micro benchmark's checkpoints copied: these runs write caches into the model folder, and
    the session's benchmark must stay as built for the other test files."""
    ckpt, data = micro_benchmark
    copy = tmp_path_factory.mktemp("distributed") / "checkpoints"
    shutil.copytree(ckpt, copy)
    return str(copy), data


def _common(benchmark, out):
    ckpt, data = benchmark
    # the native CPU paths on both sides: the one-process reference runs inside this (unpinned) test
    # process, so the ranks must not restart on the pinned ones (compute/cpu_paths.py)
    return {"model_name": "taskmerge-tiny-micro", "checkpoint_dir": ckpt, "data_location": data,
            "device": "cpu", "save_dir": "", "log_dir": str(out / "logs"), "cpu_paths": "native"}


def _args(settings: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in settings.items()]


def _torchrun(script_args: list[str], cwd: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("TASKMERGE_DEBUG", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={RANKS}",
           *script_args]
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def _reports(log_dir) -> list[dict]:
    return [json.load(open(p)) for p in sorted(glob.glob(os.path.join(log_dir, "**", "*.json"), recursive=True))]


def _logs(log_dir) -> list[str]:
    return sorted(glob.glob(os.path.join(log_dir, "**", "*.txt"), recursive=True))


ADAMERGING = {"method_name": "lw_adamerging", "coefficients": "learn", "adamerging_steps": 4,
              "adamerging_eval_every": 2, "checkpoint_every": 2}


def _close(a, b, tol=1e-6):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k], tol) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) or isinstance(b, float):
        return abs(a - b) <= tol
    return a == b


def test_adamerging_on_two_ranks_matches_one_process_and_only_rank0_writes(micro_copy, tmp_path):
    one = run_adamerging(script_config("main_AdaMerging.py", **_common(micro_copy, tmp_path / "one"),
                                       resume_dir="", **ADAMERGING), script="main_AdaMerging.py")
    settings = {**_common(micro_copy, tmp_path / "two"), "resume_dir": "", **ADAMERGING}
    _torchrun([os.path.join(SRC, "main_AdaMerging.py"), *_args(settings)], cwd=str(tmp_path))
    reports, logs = _reports(tmp_path / "two" / "logs"), _logs(tmp_path / "two" / "logs")
    assert len(reports) == 1 and len(logs) == 1   # rank 1 wrote nothing
    two = reports[0]
    assert two["compute"]["world_size"] == RANKS and two["compute"]["backend"] == "gloo"
    assert one["compute"]["world_size"] == 1
    assert two["accuracy"] == pytest.approx(one["accuracy"], abs=1e-6)
    assert two["individual_accuracy"] == pytest.approx(one["individual_accuracy"], abs=1e-6)
    assert _close(two["coefficients"], one["coefficients"])
    assert _close(two["adamerging_history"], one["adamerging_history"])
    assert two["coefficients"] != [[1.0] + [0.3] * (len(row) - 1) for row in two["coefficients"]]  # it learned
    assert "2 ranks over gloo" in open(logs[0]).read()


def test_surgery_v2_on_two_ranks_matches_one_process(micro_copy, tmp_path):
    """SurgeryV2 covers v1's sharded parts too (the features and the cache) and adds the sharded
    evaluation passes through the deep modules."""
    settings = {"surgery": "v2", "iterations": 2, "eval_iterations": 1, "resume_dir": "", "rank": 4}
    one_common = _common(micro_copy, tmp_path / "one")
    one = run_surgery(script_config("main_TaskArithmetic_with_surgery.py", **one_common, **settings,
                                    feature_cache=str(tmp_path / "cache_one")), script="surgery.py")
    two_settings = {**_common(micro_copy, tmp_path / "two"), **settings,
                    "feature_cache": str(tmp_path / "cache_two")}
    _torchrun([os.path.join(SRC, "main_TaskArithmetic_with_surgery.py"), *_args(two_settings)],
              cwd=str(tmp_path))
    two, = _reports(tmp_path / "two" / "logs")
    assert two["accuracy"] == pytest.approx(one["accuracy"], abs=1e-6)
    assert _close([h["accs"] for h in two["history"]], [h["accs"] for h in one["history"]])
    assert _close(two["representation_bias"], one["representation_bias"], tol=1e-5)
    # the expert features rank 0 cached are the whole test sets, gathered in dataset order
    assert sorted(os.listdir(tmp_path / "cache_two")) == sorted(os.listdir(tmp_path / "cache_one"))
    assert "the training is not split" in open(_logs(tmp_path / "two" / "logs")[0]).read()


KILL_AT_STEP = 2
KILLER = """
import os, runpy, sys
sys.path.insert(0, {src!r})
import taskmerge.runs.adaptive as runs_adaptive
train = runs_adaptive.train_adamerging

def killed_after_step_{k}(*args, **kwargs):
    def on_step(step):
        if step == {k} and int(os.environ["RANK"]) == 0:
            os._exit(9)   # as a kill -9 would: no cleanup, rank 1 is left waiting in a collective
    return train(*args, on_step=on_step, **kwargs)

runs_adaptive.train_adamerging = killed_after_step_{k}
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_a_two_rank_run_killed_mid_training_resumes_to_the_same_coefficients(micro_copy, tmp_path):
    reference = run_adamerging(script_config("main_AdaMerging.py", **_common(micro_copy, tmp_path / "ref"),
                                             resume_dir="", **ADAMERGING), script="main_AdaMerging.py")
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER.format(src=SRC, k=KILL_AT_STEP))
    settings = {**_common(micro_copy, tmp_path / "run"), "resume_dir": str(tmp_path / "resume"),
                **ADAMERGING}
    script = os.path.join(SRC, "main_AdaMerging.py")
    killed = _torchrun([str(killer), script, *_args(settings)], cwd=str(tmp_path), check=False)
    assert killed.returncode != 0
    assert glob.glob(str(tmp_path / "resume" / "adamerging_*.pt"))   # rank 0's state at step 2
    assert not _reports(tmp_path / "run" / "logs")
    _torchrun([script, *_args(settings)], cwd=str(tmp_path))
    resumed, = _reports(tmp_path / "run" / "logs")
    log = open(os.path.join(os.path.dirname(_logs(tmp_path / "run" / "logs")[-1]), resumed["log"])).read()
    assert f"at step {KILL_AT_STEP}" in log
    assert _close(resumed["coefficients"], reference["coefficients"])
    assert resumed["accuracy"] == pytest.approx(reference["accuracy"], abs=1e-6)


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("rank", [0, 1])
def test_a_rank_whose_peers_never_come_stops_in_bounded_time_saying_so(monkeypatch, rank):
    from taskmerge.compute import distributed
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(_free_port()))
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    with pytest.raises(distributed.RendezvousError) as e:
        distributed.init(torch.device("cpu"), rendezvous_timeout_s=2)
    message = str(e.value)  # the wait that ended is the configured one, not torch's hour
    assert f"rank {rank} of 2" in message and "within 2 s" in message and "rendezvous_timeout" in message
    assert ("only 1 of 2 ranks" if rank == 0 else "could not reach") in message
    assert not torch.distributed.is_initialized()


def test_a_world_size_without_a_launcher_is_one_clear_error(monkeypatch):
    from taskmerge.compute import distributed
    monkeypatch.setenv("WORLD_SIZE", "2")
    for k in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(distributed.RendezvousError, match="torchrun --nproc_per_node"):
        distributed.init(torch.device("cpu"))


def test_an_unwritable_log_dir_under_two_ranks_is_one_line_from_rank_0(micro_copy, tmp_path):
    settings = {**_common(micro_copy, tmp_path), "log_dir": "/proc/taskmerge-logs"}
    done = _torchrun([os.path.join(SRC, "main_WeightAveraging.py"), *_args(settings)], cwd=str(tmp_path),
                     check=False)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode != 0
    assert len(errors) == 1 and "log_dir='/proc/taskmerge-logs'" in errors[0], done.stderr[-3000:]
    # torchrun's own launcher reports a failed child with its traceback; the ranks print none.
    assert "gloo" not in done.stderr.lower() and "taskmerge" not in done.stderr.replace(errors[0], "")
    assert "/src/main_WeightAveraging.py FAILED" in done.stderr
