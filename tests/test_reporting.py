import json
import os

from taskmerge.runs.reporting import RunLogger, log_path, results_table


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
