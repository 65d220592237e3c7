"""A user's mistake reaches the terminal as one line (`error: …`, exit 2) naming the setting; a bug
keeps its traceback; --debug=True or TASKMERGE_DEBUG=1 shows the traceback of input errors too."""
import os
import runpy
import subprocess
import sys

import pytest
from script_variables import SRC

from taskmerge.runs.cli import EXIT_INPUT_ERROR, main, split_debug
from taskmerge.runs.methods import TaskArithmeticConfig
from taskmerge.storage.checkpoints import CheckpointError
from taskmerge.storage.errors import ConfigError

ROOT = os.path.dirname(SRC)


def _script(name, *args, env=None):
    return subprocess.run([sys.executable, os.path.join("src", name), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


def _run_in_process(name, *args, monkeypatch):
    """The script as `python src/<name> args` would run it, in this interpreter (a new one per
    case costs more than the rest of this file on a loaded machine)."""
    monkeypatch.setattr(sys, "argv", [os.path.join(SRC, name), *args])
    runpy.run_path(os.path.join(SRC, name), run_name="__main__")


def test_a_bad_setting_is_one_line_on_stderr_and_exit_2_for_a_real_process():
    result = _script("main_TaskArithmetic_with_surgery.py", "--surgery=v3")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == EXIT_INPUT_ERROR, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and "surgery='v3'" in lines[0], result.stderr
    assert "Traceback" not in result.stderr and "Config:" not in result.stdout


def test_debug_true_shows_the_traceback_of_an_input_error():
    result = _script("main_TaskArithmetic_with_surgery.py", "--rank=0", "--debug=True")
    assert result.returncode not in (0, EXIT_INPUT_ERROR)
    assert "Traceback (most recent call last)" in result.stderr
    assert "ConfigError" in result.stderr and "rank=0" in result.stderr


@pytest.mark.parametrize("script,args,named", [
    ("main_TiesMerging.py", ["--k='0.2'"], "k='0.2'"),
    ("main_TaskArithmetic.py", ["--scaling_coeff=0.5"], "--scaling_coeff"),
    ("main_TaskArithmetic.py", ["--batch_size=0"], "batch_size=0"),
    ("eval_single_task.py", ["--split=bogus"], "split='bogus'"),
    ("main_AdaMerging_with_surgery_online.py", ["--surgery=v2"], "online=True"),
    ("convert_checkpoints.py", ["--family=pickle"], "family='pickle'"),
    ("build_embedded_benchmark.py", ["--micro=yes"], "--micro=yes"),
])
def test_every_kind_of_script_reports_a_bad_setting_in_one_line(script, args, named, capsys, monkeypatch):
    monkeypatch.delenv("TASKMERGE_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_:
        _run_in_process(script, *args, monkeypatch=monkeypatch)
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert exit_.value.code == EXIT_INPUT_ERROR
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], captured.err
    assert "Config:" not in captured.out  # refused before the run started


def test_the_debug_env_var_lets_an_input_error_through(monkeypatch):
    monkeypatch.setenv("TASKMERGE_DEBUG", "1")
    with pytest.raises(ConfigError, match="rank=0"):
        _run_in_process("main_TaskArithmetic_with_surgery.py", "--rank=0", monkeypatch=monkeypatch)


NAMESPACE = {"__file__": "main_TaskArithmetic.py", "model_name": "auto", "checkpoint_dir": "c",
             "data_location": "d", "data_format": "folders", "trust_label_order": False, "tasks": [],
             "log_dir": "l", "cache_dir": "auto", "batch_size": 8,
             "save_dir": "", "device": "cpu", "tf32": False, "num_workers": 0, "threads": 1, "cpu_paths": "auto", "rendezvous_timeout": 300,
             "scaling_coef": 0.3, "select_on_val": False, "val_grid": "tall_masks",
             "dare_p": 0.0, "dare_rescale": True, "dare_seed": 0}


def test_an_input_error_raised_inside_the_run_is_one_line_too(capsys, monkeypatch):
    monkeypatch.delenv("TASKMERGE_DEBUG", raising=False)

    def run(config, script):
        raise CheckpointError("checkpoints/x/zeroshot.pt: truncated file;\n  download it again")

    with pytest.raises(SystemExit) as exit_:
        main(run, TaskArithmeticConfig, dict(NAMESPACE), argv=[])
    assert exit_.value.code == EXIT_INPUT_ERROR
    assert capsys.readouterr().err == "error: checkpoints/x/zeroshot.pt: truncated file; download it again\n"


def test_a_bug_keeps_its_traceback(monkeypatch):
    monkeypatch.delenv("TASKMERGE_DEBUG", raising=False)

    def run(config, script):
        return 1 / 0

    with pytest.raises(ZeroDivisionError):
        main(run, TaskArithmeticConfig, dict(NAMESPACE), argv=[])


def test_the_run_gets_the_checked_config_and_the_script(monkeypatch):
    monkeypatch.delenv("TASKMERGE_DEBUG", raising=False)
    got = main(lambda config, script: (config, script), TaskArithmeticConfig, dict(NAMESPACE),
               argv=["--scaling_coef=1", "--debug=False"])
    expected = TaskArithmeticConfig(model_name="auto", checkpoint_dir="c", data_location="d",
                                    data_format="folders", trust_label_order=False, tasks=[],
                                    log_dir="l", cache_dir="auto", batch_size=8, device="cpu", tf32=False,
                                    num_workers=0,
                                    threads=1, cpu_paths="auto", rendezvous_timeout=300.0, save_dir="", scaling_coef=1.0,
                                    select_on_val=False, val_grid="tall_masks", dare_p=0.0,
                                    dare_rescale=True, dare_seed=0)
    assert got == (expected, "main_TaskArithmetic.py")
    assert isinstance(got[0].scaling_coef, float)


def test_debug_flag_parsing(monkeypatch):
    monkeypatch.delenv("TASKMERGE_DEBUG", raising=False)
    assert split_debug(["--a=1", "--debug=True"]) == (True, ["--a=1"])
    assert split_debug(["--debug=False"]) == (False, [])
    monkeypatch.setenv("TASKMERGE_DEBUG", "1")
    assert split_debug([]) == (True, [])
    with pytest.raises(ConfigError, match="--debug=yes"):
        split_debug(["--debug=yes"])
