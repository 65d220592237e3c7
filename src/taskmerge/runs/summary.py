"""Results tables from the runs' JSON reports: what `src/summarize_results.py` prints and writes.

Every `*.json` under a log folder that is a run report becomes one row, named by
`reporting.method_label` (the label a run's own closing table uses), so a README table is
regenerated from the logs instead of assembled by hand. `eval_single_task.py`'s report gives two
rows, Zero-shot and Individual. Where several reports carry the same label for the same model, the
newest (by the timestamp in the log's name, then the file's modification time) is kept and the
others are listed as replaced. A file that is not valid JSON, or not a run report, is skipped with
one warning line naming it.
"""
from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
from dataclasses import dataclass, field

from taskmerge.runs import methods as _builtin_methods  # noqa: F401 (declares them: their labels)
from taskmerge.runs import registry
from taskmerge.runs.reporting import method_label, surgery_suffix, uses_task_identity
from taskmerge.storage import atomic
from taskmerge.storage.errors import ConfigError

# Row order of the tables: the references, then the methods in the order they are declared
# (runs/methods/__init__.py: single-model merges, AdaMerging, the records), those with task identity
# last; Surgery rows follow, in their bases' order.
_STAMP = re.compile(r"_(\d{8}_\d{6})(?:_(\d+))?$")


@dataclass
class Row:
    """One table row: a label and its accuracies (fractions), from one report file."""
    model: str
    family: str
    method: str
    label: str
    accuracy: dict[str, float]
    average: float
    normalized_average: float | None
    path: str
    order: tuple = field(default=(), repr=False)
    surgery: dict | None = None         # Surgery runs: variant, base label, base accuracy, biases


@dataclass
class Summary:
    rows: list[Row]
    replaced: list[tuple[str, str]]     # (older report's path, the newer one kept for its label)
    skipped: list[tuple[str, str]]      # (path, why)


def _age_key(path: str) -> tuple:
    """Newer sorts later: the log name's timestamp (and same-second `_2` suffix), then the mtime."""
    match = _STAMP.search(os.path.splitext(os.path.basename(path))[0])
    stamp, n = (match.group(1), int(match.group(2) or 1)) if match else ("", 0)
    return stamp, n, os.path.getmtime(path)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _rows_of(report: dict, path: str) -> list[Row]:
    model, family = str(report.get("model", "?")), str(report.get("checkpoint_family", "?"))
    method = str(report["method"])
    surgery, identity = bool(report.get("surgery")), uses_task_identity(report)
    declared = list(registry.METHODS)
    found = registry.declared(method)
    rank = (int(identity), -1 if method == "single_task" else
            declared.index(found.name) if found else len(declared))
    if method == "single_task":
        split = "" if report.get("split", "test") == "test" else f" ({report['split']} split)"
        zeroshot, individual = report["zeroshot_accuracy"], report["individual_accuracy"]
        norm = _mean(zeroshot[t] / individual[t] for t in zeroshot if individual.get(t))
        return [Row(model, family, method, "Zero-shot" + split, zeroshot, _mean(zeroshot.values()), norm,
                    path, (0, rank, 0)),
                Row(model, family, method, "Individual" + split, individual, _mean(individual.values()),
                    1.0, path, (0, rank, 1))]
    accs = report["accuracy"]
    average = report.get("average_accuracy", _mean(accs.values()))
    label = method_label(report)
    return [Row(model, family, method, label, accs, average, report.get("average_normalized_accuracy"),
                path, (int(surgery), rank, 0, label), _surgery_info(report, label) if surgery else None)]


def _surgery_info(report: dict, label: str) -> dict:
    suffix = surgery_suffix(report)
    stage = f"surgery_{report['surgery']}" + ("_online" if report.get("online") else "")
    bias = (report.get("representation_bias") or {}).get("average") or {}
    final = {k: (bias.get(k) or {}).get("final") for k in ("merged", stage)}
    base = report.get("base_accuracy")
    return {"variant": suffix.strip(" +"), "base_label": label[:len(label) - len(suffix)],
            "base_average": _mean(base.values()) if isinstance(base, dict) else None,
            "base_bias": final["merged"], "bias": final[stage],
            "individual_average": _mean((report.get("individual_accuracy") or {}).values())}


def _read_report(path: str) -> tuple[dict | None, str]:
    try:
        with open(path, encoding="utf-8") as f:
            report = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"not valid JSON ({e})"
    if not isinstance(report, dict) or "method" not in report:
        return None, "not a run report (no 'method')"
    if report["method"] == "single_task":
        if not all(isinstance(report.get(k), dict) for k in ("zeroshot_accuracy", "individual_accuracy")):
            return None, "single-task report without 'zeroshot_accuracy' / 'individual_accuracy'"
    elif not isinstance(report.get("accuracy"), dict) or not report["accuracy"]:
        return None, "run report without per-task 'accuracy'"
    return report, ""


def _matches(value: str, wanted: str) -> bool:
    # a filter is one value or a comma-separated list; empty keeps everything
    names = {w.strip() for w in wanted.split(",") if w.strip()}
    return not names or value in names


def collect(log_dir: str, model: str = "", family: str = "", method: str = "") -> Summary:
    """Every run report under `log_dir` (recursively) that passes the filters, newest per label.

    `method` filters on the report's method, which for a Surgery run is its base's name (so
    `task_arithmetic` keeps Task Arithmetic with and without Surgery)."""
    if not os.path.isdir(log_dir):
        raise ConfigError(f"log_dir={log_dir!r} is not a folder: point --log_dir at the runs' "
                          f"log folder (the scripts' log_dir, src/logs by default)")
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(log_dir)
                   for name in names if name.endswith(".json"))
    newest: dict[tuple[str, str], Row] = {}
    replaced, skipped = [], []
    for path in sorted(paths, key=_age_key):
        report, why = _read_report(path)
        if report is None:
            skipped.append((path, why))
            continue
        for row in _rows_of(report, path):
            if not (_matches(row.model, model) and _matches(row.family, family)
                    and _matches(row.method, method)):
                continue
            key = (row.model, row.label)
            if key in newest and newest[key].path != path:
                replaced.append((newest[key].path, path))
            newest[key] = row
    rows = sorted(newest.values(), key=lambda r: (r.model, r.order))
    return Summary(rows, replaced, skipped)


def _tasks(rows: list[Row]) -> list[str]:
    tasks: list[str] = []
    for row in rows:
        tasks += [t for t in row.accuracy if t not in tasks]
    return tasks


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def markdown_tables(summary: Summary) -> str:
    """One Markdown table per model: label, per-task accuracy, average, normalized average (in %)."""
    out = []
    for model in dict.fromkeys(r.model for r in summary.rows):
        rows = [r for r in summary.rows if r.model == model]
        tasks = _tasks(rows)
        families = ", ".join(dict.fromkeys(r.family for r in rows))
        out += [f"{model} ({families}); accuracy in %; † task identity at inference", "",
                "| Method | " + " | ".join(tasks) + " | Avg | Norm. avg |",
                "|---" * (len(tasks) + 3) + "|"]
        for r in rows:
            cells = [_pct(r.accuracy.get(t)) for t in tasks] + [_pct(r.average), _pct(r.normalized_average)]
            out.append(f"| {r.label} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def _pct_bias(value: float | None, bias: float | None) -> str:
    return _pct(value) + ("" if bias is None else f" ({bias:.2f})")


def surgery_table(summary: Summary) -> str:
    """The README's Surgery table, per model: each base's average accuracy before and after each
    Surgery variant, with the representation bias (mean L1 to the experts' final features) in
    brackets; the base's own numbers are those the Surgery run measured before training."""
    out = []
    for model in dict.fromkeys(r.model for r in summary.rows if r.surgery):
        rows = [r for r in summary.rows if r.model == model and r.surgery]
        variants = list(dict.fromkeys(r.surgery["variant"] for r in rows))
        bases: dict[str, dict[str, Row]] = {}
        for r in rows:
            bases.setdefault(r.surgery["base_label"], {})[r.surgery["variant"]] = r
        out += [f"{model}: Surgery on each base, average accuracy in % (representation bias)", "",
                "| Base | base | " + " | ".join("+ " + v for v in variants) + " | individual |",
                "|---" * (len(variants) + 3) + "|"]
        for base, by_variant in bases.items():
            first = next((r for r in by_variant.values() if r.surgery["base_average"] is not None),
                         next(iter(by_variant.values())))
            cells = [_pct_bias(first.surgery["base_average"], first.surgery["base_bias"])]
            cells += [_pct_bias(by_variant[v].average, by_variant[v].surgery["bias"]) if v in by_variant
                      else "–" for v in variants]
            cells.append(_pct(first.surgery["individual_average"]))
            out.append(f"| {base} | " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def csv_text(summary: Summary) -> str:
    """The rows as CSV, accuracies as the fractions the reports hold (nothing rounded)."""
    tasks = _tasks(summary.rows)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["model", "checkpoint_family", "method", "label", *tasks, "average_accuracy",
                     "average_normalized_accuracy", "report"])
    for r in summary.rows:
        writer.writerow([r.model, r.family, r.method, r.label, *[r.accuracy.get(t, "") for t in tasks],
                         r.average, "" if r.normalized_average is None else r.normalized_average, r.path])
    return buf.getvalue()


def summarize(log_dir: str, csv_path: str = "", model: str = "", family: str = "", method: str = "",
              out=None) -> Summary:
    """Print the tables (and what was replaced or skipped) and write the CSV atomically."""
    out = out or sys.stdout
    summary = collect(log_dir, model, family, method)
    for path, why in summary.skipped:
        print(f"warning: skipped {path}: {why}", file=sys.stderr)
    if summary.replaced:
        print(f"{len(summary.replaced)} older report(s) replaced by a newer one of the same label:", file=out)
        for old, new in summary.replaced:
            print(f"  {old} -> {new}", file=out)
        print(file=out)
    if not summary.rows:
        print(f"No run reports under {log_dir} match model={model!r} family={family!r} "
              f"method={method!r}.", file=out)
    else:
        print(markdown_tables(summary), file=out)
        if any(r.surgery for r in summary.rows):
            print(surgery_table(summary), file=out)
    if csv_path:
        atomic.write_text(csv_path, csv_text(summary))
        print(f"Wrote {csv_path} ({len(summary.rows)} rows)", file=out)
    return summary
