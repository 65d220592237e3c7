"""A method declared the documented way (docs/ADDING_A_METHOD.md) runs everywhere a built-in one runs,
with no file of taskmerge edited: a toy "scaled average" (θ0 + c · mean τ) is declared in a module
and an entry script written here, then run plain, as a Surgery v1 and a SurgeryV2 base, labelled in
the run's closing table and in the summary, and its setting reaches the cache keys."""
import glob
import importlib
import json
import os
import runpy
import sys
import textwrap

import pytest
from script_variables import SRC, script_variables

from taskmerge.runs import registry
from taskmerge.runs.adaptive import run_surgery
from taskmerge.runs.cli import main_on_any_base
from taskmerge.runs.summary import collect, markdown_tables

DECLARATION = '''
"""Scaled average: θ = θ0 + c · (1/T) Σ τ_t (a toy method)."""
from dataclasses import dataclass

from taskmerge.merging.task_vectors import apply
from taskmerge.runs.data_free import Merge
from taskmerge.runs.registry import Method, declare
from taskmerge.runs.reporting import num
from taskmerge.runs.script_configs import merge_config, surgery_config
from taskmerge.runs.settings import setting


def scaled_average(pretrained, experts, c):
    """The math: a pure function of state dicts."""
    mean_tau = {{k: sum(e[k] - pretrained[k] for e in experts.values()) / len(experts)
                for k in pretrained if pretrained[k].is_floating_point()}}
    return apply(pretrained, mean_tau, c)


@dataclass
class ScaledAverageSettings:
    scale: float = setting(gt=0.0, finite=True)     # c


def merge(run, s):
    pretrained, experts = run.experts()
    merged = scaled_average(dict(pretrained.items()), {{t: dict(e.items()) for t, e in experts.items()}},
                            s.scale)
    return Merge(f"scaled_average_{{s.scale}}", merged, extra={{"scale": s.scale}})


METHOD = declare(Method("scaled_average", ScaledAverageSettings, merge,
                        label=lambda report: f"scaled_average (c {{num(report['scale'])}})",
                        script={script!r}, bases={{"scaled_average": {{}}}},
                        coefficient_keys=("scale",)))
ScaledAverageConfig = merge_config(METHOD)
'''

SCRIPT = '''"""Scaled average (a toy method)."""
from toy_scaled_average import ScaledAverageConfig
from taskmerge.runs.cli import main
from taskmerge.runs.data_free import run_data_free

{run_settings}
# method
scale = 0.5                   # c

if __name__ == "__main__":
    main(run_data_free, ScaledAverageConfig, globals())
'''


@pytest.fixture
def toy(tmp_path, monkeypatch):
    """The toy method's declaration module and entry script, in a folder of this test's own."""
    folder = tmp_path / "toy"
    folder.mkdir()
    script = folder / "main_ScaledAverage.py"
    (folder / "toy_scaled_average.py").write_text(DECLARATION.format(script=str(script)))
    ta = script_variables("main_TaskArithmetic.py")
    run_settings = "\n".join(f"{k} = {v!r}" for k, v in ta.items()
                             if k not in ("scaling_coef", "select_on_val", "val_grid", "dare_p",
                                          "dare_rescale", "dare_seed"))
    script.write_text(SCRIPT.format(run_settings=run_settings))
    monkeypatch.syspath_prepend(str(folder))
    sys.modules.pop("toy_scaled_average", None)
    yield script
    registry.METHODS.pop("scaled_average", None)
    sys.modules.pop("toy_scaled_average", None)


def _run_script(script, monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", [str(script), *args])
    return runpy.run_path(str(script), run_name="__main__")


def _reports(log_dir):
    return [json.load(open(p)) for p in sorted(glob.glob(os.path.join(log_dir, "**", "*.json"), recursive=True))]


def test_a_toy_method_runs_plain_and_as_both_surgery_bases_labelled_everywhere(
        toy, micro_benchmark, tmp_path, monkeypatch, capsys):
    ckpt, data = micro_benchmark
    where = ["--model_name=taskmerge-tiny-micro", f"--checkpoint_dir={ckpt}", f"--data_location={data}",
             f"--log_dir={tmp_path / 'logs'}", "--device=cpu"]
    _run_script(toy, monkeypatch, *where, f"--save_dir={tmp_path / 'merged'}")
    plain, = _reports(tmp_path / "logs")
    assert plain["method"] == "scaled_average" and plain["scale"] == 0.5
    assert "| scaled_average (c 0.5) |" in capsys.readouterr().out  # the run's closing table
    # the setting names the saved merge: another c is another file, never an overwrite
    _run_script(toy, monkeypatch, *where, f"--save_dir={tmp_path / 'merged'}", "--scale=0.7")
    assert len(glob.glob(str(tmp_path / "merged" / "**" / "*.safetensors"), recursive=True)) == 2

    surgery_namespace = {"__file__": os.path.join(SRC, "main_Surgery.py"),
                         **script_variables("main_Surgery.py")}
    common = [*where, "--method_name=scaled_average", "--save_dir=", "--iterations=2",
              "--eval_iterations=2", "--rank=2", f"--resume_dir={tmp_path / 'resume'}",
              "--checkpoint_every=1"]
    for version in ("v1", "v2"):
        report = main_on_any_base(run_surgery, dict(surgery_namespace), [*common, f"--surgery={version}"])
        assert report["method"] == "scaled_average" and report["scale"] == 0.5  # the toy script's default
        assert report["base"] == "scaled_average_0.5"
    # the base's setting is in the resume key: another c does not resume the first run's state
    other = main_on_any_base(run_surgery, dict(surgery_namespace), [*common, "--surgery=v1", "--scale=0.7"])
    assert other["base"] == "scaled_average_0.7"
    log = open(glob.glob(str(tmp_path / "logs" / "**" / other["log"]), recursive=True)[0]).read()
    assert "Resumed" not in log

    labels = {row.label for row in collect(str(tmp_path / "logs")).rows}
    assert {"scaled_average (c 0.5)", "scaled_average (c 0.7)", "scaled_average (c 0.5) + Surgery v1",
            "scaled_average (c 0.5) + SurgeryV2", "scaled_average (c 0.7) + Surgery v1"} <= labels
    assert "scaled_average (c 0.5) + SurgeryV2" in markdown_tables(collect(str(tmp_path / "logs")))


def test_a_bad_setting_of_the_toy_method_is_one_line(toy, capsys, monkeypatch):
    with pytest.raises(SystemExit):
        _run_script(toy, monkeypatch, "--scale=-1.0")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "scale=-1.0" in err[0] and "> 0.0" in err[0]


def test_a_module_in_the_methods_folder_is_declared_without_editing_the_package(tmp_path, monkeypatch):
    """The documented place for a method of your own: one file in runs/methods/ (a copy of the
    package here, so the checkout stays untouched)."""
    import shutil

    import taskmerge.runs.methods as methods
    package = tmp_path / "pkg" / "taskmerge_copy_methods"
    shutil.copytree(os.path.dirname(methods.__file__), package,
                    ignore=shutil.ignore_patterns("__pycache__"))
    (package / "scaled_average.py").write_text(textwrap.dedent(DECLARATION.format(script="main_ScaledAverage.py")))
    init = (package / "__init__.py").read_text().replace("taskmerge.runs.methods", "taskmerge_copy_methods")
    (package / "__init__.py").write_text(init)
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    saved = dict(registry.METHODS)
    try:
        importlib.import_module("taskmerge_copy_methods")
        assert "scaled_average" in registry.METHODS and "scaled_average" in registry.bases()
    finally:
        registry.METHODS.clear()
        registry.METHODS.update(saved)
        for name in [m for m in sys.modules if m.startswith("taskmerge_copy_methods")]:
            sys.modules.pop(name)
