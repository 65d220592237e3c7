"""A user's mistake reaches the terminal as one line (`error: …`, exit 2) naming the setting; a bug
keeps its traceback; --debug=True or TASKMERGE_DEBUG=1 shows the traceback of input errors too."""
import os
import subprocess
import sys

import pytest
from script_variables import SRC

from taskmerge.runs.cli import EXIT_INPUT_ERROR, main, split_debug
from taskmerge.runs.script_configs import TaskArithmeticConfig
from taskmerge.storage.checkpoints import CheckpointError
from taskmerge.storage.errors import ConfigError

ROOT = os.path.dirname(SRC)


def _script(name, *args, env=None):
    return subprocess.run([sys.executable, os.path.join("src", name), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {})})


@pytest.mark.parametrize("script,args,named", [
    ("main_TaskArithmetic_with_surgery.py", ["--surgery=v3"], "surgery='v3'"),
    ("main_TiesMerging.py", ["--k='0.2'"], "k='0.2'"),
    ("main_TaskArithmetic.py", ["--scaling_coeff=0.5"], "--scaling_coeff"),
    ("eval_single_task.py", ["--split=bogus"], "split='bogus'"),
])
def test_a_bad_setting_is_one_line_on_stderr_and_exit_2(script, args, named):
    result = _script(script, *args)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == EXIT_INPUT_ERROR, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], result.stderr
    assert "Traceback" not in result.stderr and "Config:" not in result.stdout


@pytest.mark.parametrize("args,env", [(["--debug=True"], None), ([], {"TASKMERGE_DEBUG": "1"})])
def test_debug_shows_the_traceback_of_an_input_error(args, env):
    result = _script("main_TaskArithmetic_with_surgery.py", "--rank=0", *args, env=env)
    assert result.returncode not in (0, EXIT_INPUT_ERROR)
    assert "Traceback (most recent call last)" in result.stderr
    assert "ConfigError" in result.stderr and "rank=0" in result.stderr


NAMESPACE = {"__file__": "main_TaskArithmetic.py", "model_name": "auto", "checkpoint_dir": "c",
             "data_location": "d", "tasks": [], "log_dir": "l", "batch_size": 8, "save_dir": "",
             "scaling_coef": 0.3, "select_on_val": False, "val_grid": "tall_masks"}


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
    expected = TaskArithmeticConfig(model_name="auto", checkpoint_dir="c", data_location="d", tasks=[],
                                    log_dir="l", batch_size=8, save_dir="", scaling_coef=1.0,
                                    select_on_val=False, val_grid="tall_masks")
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
