"""The results summary over a folder of JSON reports (filters, newest per label, bad files skipped,
CSV), and end to end: a script's run on the micro benchmark, then src/summarize_results.py over its logs."""
import csv
import json
import os
import subprocess
import sys

import pytest

from taskmerge.runs.summary import collect, summarize
from taskmerge.storage.errors import InputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = ["A", "B"]
INDIVIDUAL = {"A": 0.9, "B": 0.8}


def report(method, accs, model="tiny", family="embedded", **fields):
    norm = {t: accs[t] / INDIVIDUAL[t] for t in accs}
    return {"config": {}, "method": method, "model": model, "checkpoint_family": family,
            "tasks": TASKS, "accuracy": accs, "average_accuracy": sum(accs.values()) / len(accs),
            "individual_accuracy": INDIVIDUAL, "normalized_accuracy": norm,
            "average_normalized_accuracy": sum(norm.values()) / len(norm), **fields}


def ta(accs, **kw):
    return report("task_arithmetic", accs, merge="task_arithmetic_0.3", scaling_coef=0.3, val_curve=None,
                  **kw)


def surgery(version, accs, bias):
    return ta(accs, surgery=version, online=False, base="task_arithmetic_0.3",
              base_accuracy={"A": 0.6, "B": 0.4},
              representation_bias={"average": {"merged": {"final": 0.85},
                                               f"surgery_{version}": {"final": bias}}})


def write(folder, name, obj, mtime=None):
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return str(path)


@pytest.fixture
def logs(tmp_path):
    d = tmp_path / "logs"
    write(d, "single_task/tiny/log_eval_single_task_single_task_tiny_20260101_000000.json",
          {"config": {}, "method": "single_task", "model": "tiny", "checkpoint_family": "embedded",
           "tasks": TASKS, "split": "test", "zeroshot_accuracy": {"A": 0.45, "B": 0.4},
           "individual_accuracy": INDIVIDUAL})
    # two Task Arithmetic runs at λ 0.3: the later log name wins, though its file is the older one
    write(d, "merging/tiny/log_main_TaskArithmetic_task_arithmetic_tiny_20260101_000000.json",
          ta({"A": 0.1, "B": 0.1}), mtime=2_000_000_000)
    write(d, "merging/tiny/log_main_TaskArithmetic_task_arithmetic_tiny_20260102_000000.json",
          ta({"A": 0.729, "B": 0.683}), mtime=1_000_000_000)
    write(d, "merging/tiny/log_main_WeightAveraging_weight_averaging_tiny_20260101_000000.json",
          report("weight_averaging", {"A": 0.7, "B": 0.6}, merge="weight_averaging", drop_last=False))
    write(d, "run/tiny/log_main_TaskArithmetic_with_surgery_task_arithmetic_tiny_20260101_000000.json",
          surgery("v1", {"A": 0.87, "B": 0.75}, 0.33))
    write(d, "Surgery/tiny/log_main_TaskArithmetic_with_surgery_task_arithmetic_tiny_20260101_000001.json",
          surgery("v2", {"A": 0.9, "B": 0.79}, 0.17))
    write(d, "merging/ViT-B-32/log_main_TaskArithmetic_task_arithmetic_ViT-B-32_20260101_000000.json",
          ta({"A": 0.5, "B": 0.5}, model="ViT-B-32", family="task_vectors"))
    write(d, "merging/tiny/broken.json", '{"method": "task_arith')
    write(d, "merging/tiny/coefficients.json", {"coefficients": [[1.0, 0.3]]})
    return d


def test_every_report_becomes_a_row_the_newest_per_label(logs):
    summary = collect(str(logs), model="tiny")
    labels = [r.label for r in summary.rows]
    assert labels == ["Zero-shot", "Individual", "weight_averaging", "task_arithmetic (λ 0.3)",
                      "task_arithmetic (λ 0.3) + Surgery v1", "task_arithmetic (λ 0.3) + SurgeryV2"]
    row = summary.rows[3]
    assert row.accuracy == {"A": 0.729, "B": 0.683} and row.path.endswith("20260102_000000.json")
    assert [(os.path.basename(old), os.path.basename(new)) for old, new in summary.replaced] == [
        ("log_main_TaskArithmetic_task_arithmetic_tiny_20260101_000000.json",
         "log_main_TaskArithmetic_task_arithmetic_tiny_20260102_000000.json")]
    assert summary.rows[0].normalized_average == pytest.approx((0.45 / 0.9 + 0.4 / 0.8) / 2)


def test_filters_on_model_family_and_method(logs):
    assert {r.model for r in collect(str(logs)).rows} == {"tiny", "ViT-B-32"}
    assert [r.label for r in collect(str(logs), family="task_vectors").rows] == ["task_arithmetic (λ 0.3)"]
    # a Surgery run's method is its base's, so the filter keeps it
    kept = collect(str(logs), model="tiny", method="task_arithmetic").rows
    assert [r.label for r in kept] == ["task_arithmetic (λ 0.3)", "task_arithmetic (λ 0.3) + Surgery v1",
                                       "task_arithmetic (λ 0.3) + SurgeryV2"]
    kept = collect(str(logs), model="tiny", method="single_task, weight_averaging").rows
    assert [r.label for r in kept] == ["Zero-shot", "Individual", "weight_averaging"]


def test_tables_printed_and_csv_written_bad_files_skipped_with_a_warning(logs, tmp_path, capsys):
    csv_path = tmp_path / "out" / "results.csv"
    summary = summarize(str(logs), str(csv_path), model="tiny")
    out, err = capsys.readouterr()
    warnings = err.splitlines()
    assert len(warnings) == 2
    assert warnings[0].startswith(f"warning: skipped {logs / 'merging/tiny/broken.json'}: not valid JSON")
    assert warnings[1] == (f"warning: skipped {logs / 'merging/tiny/coefficients.json'}: "
                           f"not a run report (no 'method')")
    lines = out.splitlines()
    assert "| Method | A | B | Avg | Norm. avg |" in lines
    assert "| task_arithmetic (λ 0.3) | 72.9 | 68.3 | 70.6 | 83.2 |" in lines
    assert "| Zero-shot | 45.0 | 40.0 | 42.5 | 50.0 |" in lines
    # the Surgery table: base measured by the Surgery runs, each variant, bias in brackets
    assert "| task_arithmetic (λ 0.3) | 50.0 (0.85) | 81.0 (0.33) | 84.5 (0.17) | 85.0 |" in lines
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(summary.rows) == 6
    assert rows[3]["label"] == "task_arithmetic (λ 0.3)" and float(rows[3]["A"]) == 0.729
    assert float(rows[3]["average_normalized_accuracy"]) == pytest.approx((0.729 / 0.9 + 0.683 / 0.8) / 2)
    assert os.listdir(csv_path.parent) == ["results.csv"]  # written atomically: no temporary left


def test_a_log_dir_that_is_not_a_folder_is_refused_by_name(tmp_path):
    with pytest.raises(InputError, match="log_dir=.*nowhere.*is not a folder"):
        collect(str(tmp_path / "nowhere"))


def test_a_script_run_then_summarized_from_its_logs(micro_benchmark, tmp_path):
    ckpt, data = micro_benchmark
    logs = tmp_path / "logs"
    run = subprocess.run([sys.executable, os.path.join(REPO, "src", "main_TaskArithmetic.py"),
                          "--model_name=taskmerge-tiny-micro", f"--checkpoint_dir={ckpt}",
                          f"--data_location={data}", f"--log_dir={logs}",
                          f"--save_dir={tmp_path / 'merged'}"],
                         capture_output=True, text=True, cwd=REPO, timeout=600)
    assert run.returncode == 0, run.stderr
    (report_path,) = [os.path.join(r, f) for r, _, fs in os.walk(logs) for f in fs if f.endswith(".json")]
    with open(report_path) as f:
        report = json.load(f)
    csv_path = tmp_path / "results.csv"
    summary = subprocess.run([sys.executable, os.path.join(REPO, "src", "summarize_results.py"),
                              f"--log_dir={logs}", f"--csv_path={csv_path}"],
                             capture_output=True, text=True, cwd=REPO, timeout=300)
    assert summary.returncode == 0, summary.stderr
    cells = [f"{100 * report['accuracy'][t]:.1f}" for t in report["tasks"]]
    cells += [f"{100 * report['average_accuracy']:.1f}", f"{100 * report['average_normalized_accuracy']:.1f}"]
    assert "| task_arithmetic (λ 0.3) | " + " | ".join(cells) + " |" in summary.stdout.splitlines()
    # the run's own closing table names its row the same way
    assert any(line.startswith("| task_arithmetic (λ 0.3) | ") for line in run.stdout.splitlines())
    with open(csv_path, newline="") as f:
        (row,) = list(csv.DictReader(f))
    assert row["report"] == report_path and float(row["average_accuracy"]) == report["average_accuracy"]


def test_rows_with_task_identity_come_after_the_single_merged_models(tmp_path):
    for i, (method, fields) in enumerate([
            ("tsv_merging", {"merge": "TSVC", "task_identity": True, "alpha": 1.0}),
            ("emr_merging", {"merge": "emr_code", "task_identity": True, "rescaler": "code"}),
            ("tsv_merging", {"merge": "TSVM_1.0", "task_identity": False, "tsv_method": "TSVM",
                             "alpha": 1.0}),
            ("lw_adamerging", {"coefficients_source": "published"})]):
        write(tmp_path, f"log_{i}.json", report(method, {"A": 0.5, "B": 0.5}, **fields))
    assert [r.label for r in collect(str(tmp_path)).rows] == [
        "tsv_merging (TSVM, α 1.0)", "lw_adamerging (published coefficients)",
        "emr_merging (code rescaler) †", "tsv_merging (TSVC) †"]
