"""Every entry-script path end to end on the micro embedded benchmark: the same code that runs on
ViT-B/32, on a model small enough for CI. Checks that the reports are complete and that the
methods agree with each other where they must (WA = TA at 1/T; Surgery step 0 = its base)."""
import json
import os

import pytest
from script_variables import script_config

from taskmerge.runs.adaptive import run_adamerging, run_surgery
from taskmerge.runs.data_free import run_data_free, run_single_task_eval

SCRIPT = {"weight_averaging": "main_WeightAveraging.py", "task_arithmetic": "main_TaskArithmetic.py",
          "ties_merging": "main_TiesMerging.py", "emr_merging": "main_EMRMerging.py",
          "tsv_merging": "main_TSVMerging.py", "tall_masks": "main_TallMasks.py"}


@pytest.fixture(scope="module")
def config(micro_benchmark, tmp_path_factory):
    """Where the runs go: the micro benchmark, and a folder of this module's own."""
    ckpt, data = micro_benchmark
    out = tmp_path_factory.mktemp("runs")
    return {"model_name": "taskmerge-tiny-micro", "checkpoint_dir": ckpt, "data_location": data,
            "log_dir": str(out / "logs"), "save_dir": str(out / "merged")}


def _check_report(report, config):
    assert set(report["accuracy"]) == set(report["tasks"]) and len(report["tasks"]) >= 3
    assert all(0.0 <= a <= 1.0 for a in report["accuracy"].values())
    assert report["average_accuracy"] == pytest.approx(
        sum(report["accuracy"].values()) / len(report["accuracy"]))
    logs = _logs_of(config, report)
    assert len(logs) == 1
    lines = open(logs[0]).read().splitlines()
    assert lines[0].startswith("Config: ")
    assert json.loads(lines[0][len("Config: "):])["model_name"] == "taskmerge-tiny-micro"
    assert any(line.startswith("Eval: ") and " Avg ACC:" in line for line in lines)
    saved = json.load(open(os.path.splitext(logs[0])[0] + ".json"))
    assert saved["accuracy"] == report["accuracy"]


def test_single_task_eval_reports_both_reference_rows(config):
    settings = {k: v for k, v in config.items() if k != "save_dir"}
    report = run_single_task_eval(script_config("eval_single_task.py", **settings, split="test"),
                                  script="eval_single_task.py")
    assert set(report["zeroshot_accuracy"]) == set(report["individual_accuracy"]) == set(report["tasks"])


@pytest.mark.parametrize("name,extra", [
    ("weight_averaging", {"drop_last": False}),
    ("task_arithmetic", {"scaling_coef": 0.3}),
    ("task_arithmetic", {"select_on_val": True, "val_grid": "tall_masks"}),
    ("ties_merging", {"preset": "ennengyang"}),
    ("emr_merging", {"rescaler": "code"}),
    ("tsv_merging", {"method": "TSVM", "select_on_val": False, "alpha": 1.0}),
    ("tsv_merging", {"method": "TSVC"}),
    ("tall_masks", {"method": "tall_mask"}),
    ("tall_masks", {"method": "consensus", "select_on_val": False, "alpha": 1.0}),
])
def test_data_free_methods_run_and_report(config, name, extra):
    report = run_data_free(script_config(SCRIPT[name], **config, **extra), script=f"main_{name}.py")
    _check_report(report, config)
    assert report["task_identity"] == (name == "emr_merging" or extra.get("method") in ("TSVC", "tall_mask"))
    assert set(report["normalized_accuracy"]) == set(report["tasks"])
    merged_files = os.listdir(os.path.join(config["save_dir"], "taskmerge-tiny-micro"))
    assert os.path.basename(report["merged_file"]) in merged_files


def test_weight_averaging_equals_task_arithmetic_at_one_over_t(config):
    wa = run_data_free(script_config("main_WeightAveraging.py", **config), script="wa.py")
    t = len(wa["tasks"])
    ta = run_data_free(script_config("main_TaskArithmetic.py", **config, scaling_coef=1.0 / t),
                       script="ta.py")
    assert wa["accuracy"] == ta["accuracy"]


def test_adamerging_learns_and_saves_coefficients(config):
    report = run_adamerging(script_config("main_AdaMerging.py", **config, resume_dir="",
                                          method_name="tw_adamerging", coefficients="learn",
                                          adamerging_steps=3, adamerging_eval_every=3), script="ada.py")
    _check_report(report, config)
    rows = report["coefficients"]
    assert len(rows) == 1 and rows[0][0] == 1.0 and len(rows[0]) == 1 + len(report["tasks"])
    assert os.path.exists(report["coefficients_file"])


@pytest.mark.parametrize("surgery,online", [("v1", False), ("v2", False), ("v1", True)])
def test_surgery_starts_at_its_base_and_reduces_representation_bias(config, surgery, online):
    base = run_data_free(script_config("main_TaskArithmetic.py", **config, scaling_coef=0.3),
                         script="ta.py")
    report = run_surgery(script_config("main_TaskArithmetic_with_surgery.py", **config, resume_dir="",
                                       surgery=surgery, online=online, iterations=4, eval_iterations=2,
                                       rank=4), script="surgery.py")
    _check_report(report, config)
    if not online:
        assert report["base_accuracy"] == pytest.approx(base["accuracy"])
    stage = f"surgery_{surgery}" + ("_online" if online else "")
    bias = report["representation_bias"]["average"]
    assert bias[stage]["final"] < bias["merged"]["final"]
    assert os.path.exists(os.path.join(os.path.dirname(report_path(config, report)), report["figure"]))


def report_path(config, report):
    return _logs_of(config, report)[0]


def _logs_of(config, report):
    """The log of this very run: runs of other subfolders (Surgery v1 logs under run/, v2 under
    Surgery/) started in the same second share its name, so the report beside it must be this one."""
    logs = [os.path.join(r, f) for r, _, fs in os.walk(config["log_dir"]) for f in fs if f == report["log"]]
    as_read = json.loads(json.dumps(report, default=str))
    return [p for p in logs if json.load(open(os.path.splitext(p)[0] + ".json")) == as_read]
