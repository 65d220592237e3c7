import json
import os
from types import SimpleNamespace

import pytest

import taskmerge.runs.methods  # noqa: F401 (declares the built-in methods: their labels)
from taskmerge.runs.reporting import RunLogger, log_path, method_label, results_table
from taskmerge.runs.setup import finish_run


def test_log_lines_follow_the_originals_format_and_config_comes_first(tmp_path):
    path = log_path(str(tmp_path), "run", "ViT-B-32", "main_X", "ties", timestamp="20260101_000000")
    assert path.endswith(os.path.join("run", "ViT-B-32", "log_main_X_ties_ViT-B-32_20260101_000000.txt"))
    log = RunLogger(path, {"lr": 0.1}, echo=False)
    avg = log.eval_step(100, {"MNIST": 0.5, "DTD": 0.25})
    assert avg == 0.375
    lines = open(path).read().splitlines()
    assert lines[0].startswith("Config: ") and json.loads(lines[0][8:]) == {"lr": 0.1}
    assert lines[1] == "Eval: step: 100 dataset: MNIST ACC: 0.5"
    assert lines[2] == "Eval: step: 100 dataset: DTD ACC: 0.25"
    assert lines[3] == "Eval: step: 100 Avg ACC:0.375"
    report = log.write_report(accuracy={"MNIST": 0.5})
    saved = json.load(open(os.path.splitext(path)[0] + ".json"))
    assert saved["accuracy"] == {"MNIST": 0.5} and saved["config"] == {"lr": 0.1}
    assert report["wall_time_s"] >= 0
    assert not [f for f in os.listdir(os.path.dirname(path)) if f.endswith(".tmp")]


def test_runs_started_in_the_same_second_get_their_own_logs(tmp_path):
    args = (str(tmp_path), "run", "ViT-B-32", "main_X", "tall_masks")
    first = log_path(*args, timestamp="20260101_000000")
    second = log_path(*args, timestamp="20260101_000000")
    assert first != second and second.endswith("log_main_X_tall_masks_ViT-B-32_20260101_000000_2.txt")
    RunLogger(first, {"method": "tall_mask"}, echo=False).write_report(accuracy={})
    RunLogger(second, {"method": "consensus"}, echo=False).write_report(accuracy={})
    configs = [json.load(open(os.path.splitext(p)[0] + ".json"))["config"] for p in (first, second)]
    assert configs == [{"method": "tall_mask"}, {"method": "consensus"}]


def test_results_table_in_percent_with_average():
    table = results_table({"TA": {"A": 0.5, "B": 1.0}}, ["A", "B"])
    assert table.splitlines()[2] == "| TA | 50.00 | 100.00 | 75.00 |"


# Hand-written reports with the fields each run writes (runs/data_free.py, runs/adaptive.py).
TA = {"method": "task_arithmetic", "merge": "task_arithmetic_0.3", "task_identity": False,
      "scaling_coef": 0.3, "val_curve": None}
TIES_ON_VAL = {"method": "ties_merging", "merge": "ties_dis-mean_k0.2_0.75", "task_identity": False,
               "ties": {"k": 0.2, "merge": "dis-mean", "lam": None}, "scaling_coef": 0.75,
               "val_curve": {"0.7": 0.8, "0.75": 0.81}}
LW_LEARNED = {"method": "lw_adamerging", "adamerging": "lw_adamerging", "coefficients_source": "learn",
              "config": {"adamerging_steps": 500}}


@pytest.mark.parametrize("report,label", [
    ({"method": "weight_averaging", "merge": "weight_averaging", "drop_last": False}, "weight_averaging"),
    ({"method": "weight_averaging", "merge": "weight_averaging_drop_last", "drop_last": True},
     "weight_averaging (drop last)"),
    (TA, "task_arithmetic (λ 0.3)"),
    ({**TA, "scaling_coef": 0.25, "val_curve": {"0.25": 0.9}}, "task_arithmetic (λ 0.25 on val)"),
    ({**TA, "scaling_coef": 1 / 30, "val_curve": {"0.033": 0.9}}, "task_arithmetic (λ 0.03333 on val)"),
    ({"method": "ties_merging", "merge": "ties_dis-sum_k0.2_0.3", "scaling_coef": 0.3, "val_curve": None,
      "ties": {"k": 0.2, "merge": "dis-sum", "lam": 0.3}}, "ties_merging (dis-sum, K 0.2, λ 0.3)"),
    (TIES_ON_VAL, "ties_merging (dis-mean, K 0.2, λ 0.75 on val)"),
    ({"method": "emr_merging", "merge": "emr_code", "task_identity": True, "rescaler": "code"},
     "emr_merging (code rescaler) †"),
    ({"method": "tsv_merging", "merge": "TSVM_0.8", "task_identity": False, "tsv_method": "TSVM",
      "alpha": 0.8, "val_curve": {"0.8": 0.9}}, "tsv_merging (TSVM, α 0.8 on val)"),
    ({"method": "tsv_merging", "merge": "TSVM_2_1.0", "task_identity": False, "tsv_method": "TSVM_2",
      "alpha": 1.0, "val_curve": None}, "tsv_merging (TSVM_2, α 1.0)"),
    ({"method": "tsv_merging", "merge": "TSVC", "task_identity": True, "alpha": 1.0},
     "tsv_merging (TSVC) †"),
    ({"method": "tall_masks", "merge": "consensus_k2_0.65", "task_identity": False, "use_ties": False,
      "prun_thre_k": 2, "alpha": 0.65, "val_curve": {"0.65": 0.9}}, "consensus (k 2, α 0.65 on val)"),
    ({"method": "tall_masks", "merge": "consensus_k3_1.0_use_ties", "task_identity": False, "use_ties": True,
      "prun_thre_k": 3, "alpha": 1.0, "val_curve": None}, "consensus (TIES τ_MTL, k 3, α 1.0)"),
    ({"method": "tall_masks", "merge": "TALL_mask_5task", "task_identity": True, "use_ties": False},
     "tall_mask (λ per task on val) †"),
    (LW_LEARNED, "lw_adamerging (learned, 500 steps)"),
    ({"method": "tw_adamergingpp", "coefficients_source": "published"},
     "tw_adamergingpp (published coefficients)"),
    ({"method": "tw_adamerging", "coefficients_source": "/x/adamerging/tw_adamerging.json"},
     "tw_adamerging (coefficients tw_adamerging.json)"),
    # Surgery: the base's own fields, then the variant; a Surgery report has no task_identity field
    ({**TA, "surgery": "v1", "online": False, "base": "task_arithmetic_0.3"},
     "task_arithmetic (λ 0.3) + Surgery v1"),
    ({**LW_LEARNED, "surgery": "v2", "online": False}, "lw_adamerging (learned, 500 steps) + SurgeryV2"),
    ({**LW_LEARNED, "surgery": "v1", "online": True},
     "lw_adamerging (learned, 500 steps) + Surgery v1 online"),
    ({"method": "emr_merging", "surgery": "v1", "online": False, "base": "emr_code", "rescaler": "code"},
     "emr_merging (code rescaler) † + Surgery v1"),
    ({"method": "tsv_merging", "surgery": "v2", "online": False, "base": "TSVM_1.0", "tsv_method": "TSVM",
      "alpha": 1.0, "val_curve": None}, "tsv_merging (TSVM, α 1.0) + SurgeryV2"),
    ({"method": "consensus", "surgery": "v1", "online": False, "base": "consensus_k2_1.0", "prun_thre_k": 2,
      "alpha": 1.0, "val_curve": None, "use_ties": False}, "consensus (k 2, α 1.0) + Surgery v1"),
])
def test_method_label_says_what_was_run(report, label):
    assert method_label(report) == label


def test_method_label_of_an_unknown_or_incomplete_report_is_its_method():
    assert method_label({"method": "new_method", "scaling_coef": 0.3}) == "new_method"
    assert method_label({"method": "ties_merging"}) == "ties_merging"
    assert method_label({}) == "?"


def test_a_runs_closing_table_names_its_row_with_the_label(tmp_path):
    logger = RunLogger(str(tmp_path / "log.txt"), {"method_name": "task_arithmetic"}, echo=False)
    setup = SimpleNamespace(model_name="m", family="embedded", tasks=["A", "B"], compute=lambda: {"device": "cpu"},
                            preprocessing="open_clip")
    report = finish_run(logger, setup, "task_arithmetic", {"A": 0.5, "B": 1.0}, {"A": 1.0, "B": 1.0},
                        surgery="v1", online=False, base="task_arithmetic_0.3", scaling_coef=0.3,
                        val_curve=None)
    rows = [line for line in open(tmp_path / "log.txt").read().splitlines() if line.startswith("| ")]
    assert rows[1] == "| task_arithmetic (λ 0.3) + Surgery v1 | 50.00 | 100.00 | 75.00 |"
    assert method_label(report) == "task_arithmetic (λ 0.3) + Surgery v1"
    assert report["preprocessing"] == "open_clip"  # which image preprocessing the numbers come from
