"""Run logs in the originals' line format, a JSON report beside each log, and the label that says
what a report's run was (the row name of every results table, a run's own and the summary's).

Log lines are those of EnnengYang's scripts, so a researcher can diff ours against theirs:
`Eval: step: <k> dataset: <Name> ACC: <fraction>` and `Eval: step: <k> Avg ACC:<fraction>`.
The first line of every log is the run's full configuration. The log file is rewritten atomically
on every line (logs are small), so an interrupted run leaves a complete prefix, never a torn line.
"""
from __future__ import annotations

import itertools
import json
import os
import time
from datetime import datetime

from taskmerge.runs import registry
from taskmerge.storage import atomic
from taskmerge.storage.writer import is_writer


def log_path(log_dir: str, subfolder: str, model_name: str, script_stem: str, method: str,
             timestamp: str | None = None) -> str:
    """`<log_dir>/<subfolder>/<model>/log_<script>_<method>_<model>_<time>.txt`, claimed for this run.

    The name is taken by creating the file exclusively, so two runs started in the same second
    (two variants of one script side by side) get two logs, the later with a `_2` suffix, instead
    of one overwriting the other."""
    timestamp = timestamp or datetime.now().strftime("%Y%m%d_%H%M%S")
    folder = os.path.join(log_dir, subfolder, model_name)
    if is_writer():
        os.makedirs(folder, exist_ok=True)
    stem = f"log_{script_stem}_{method}_{model_name}_{timestamp}"
    if not is_writer():  # under torchrun rank 0 claims the name; the others write nothing
        return os.path.join(folder, stem + ".txt")
    for n in itertools.count(1):
        path = os.path.join(folder, stem + (f"_{n}" if n > 1 else "") + ".txt")
        try:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            continue
        return path


class RunLogger:
    """Collects a run's log lines (echoed to stdout) and writes log + JSON report atomically."""

    def __init__(self, path: str, config: dict, echo: bool = True):
        self.path = path
        self.report_path = os.path.splitext(path)[0] + ".json"
        self.config = dict(config)
        self.echo = echo and is_writer()
        self.lines: list[str] = []
        self.start = time.time()
        self.info("Config: " + json.dumps(self.config, sort_keys=True, default=str))

    def info(self, line: str = "") -> None:
        self.lines.append(line)
        if self.echo:
            print(line, flush=True)
        atomic.write_text(self.path, "\n".join(self.lines) + "\n")

    def eval_step(self, step, accs: dict[str, float], prefix: str = "Eval: step:") -> float:
        """Log one evaluation round in the originals' format; returns the average accuracy."""
        for name, acc in accs.items():
            self.info(f"{prefix} {step} dataset: {name} ACC: {acc}")
        avg = sum(accs.values()) / max(len(accs), 1)
        self.info(f"{prefix} {step} Avg ACC:{avg}")
        self.info()
        return avg

    def write_report(self, **fields) -> dict:
        report = {"config": self.config, "log": os.path.basename(self.path),
                  "wall_time_s": round(time.time() - self.start, 3), **fields}
        atomic.write_json(self.report_path, report)
        return report


def results_table(rows: dict[str, dict[str, float]], tasks: list[str]) -> str:
    """A Markdown table of accuracies in %, one row per method, with the average last."""
    head = "| Method | " + " | ".join(tasks) + " | Avg |"
    sep = "|---" * (len(tasks) + 2) + "|"
    out = [head, sep]
    for method, accs in rows.items():
        vals = [accs.get(t) for t in tasks]
        avg = sum(v for v in vals if v is not None) / max(sum(v is not None for v in vals), 1)
        cells = ["–" if v is None else f"{100 * v:.2f}" for v in vals]
        out.append(f"| {method} | " + " | ".join(cells) + f" | {100 * avg:.2f} |")
    return "\n".join(out)


def num(value) -> str:
    """A coefficient as the scripts write it: 0.3, 0.65, 1.0 (grid values such as 1/30 to 4 digits)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    text = f"{value:.4g}"
    return text if any(c in text for c in ".en") else text + ".0"


def on_val(report: dict) -> str:
    # a coefficient chosen on the <Task>Val splits leaves its search curve in the report
    return " on val" if report.get("val_curve") else ""


def dare_part(report: dict) -> str:
    dare = report.get("dare")
    if not isinstance(dare, dict):
        return ""
    return f"DARE p {num(dare.get('p'))}{'' if dare.get('rescale', True) else ' no rescale'}, "


def qkv_part(report: dict) -> str:
    """How attention's q/k/v met a per-tensor method, where it is not the originals' fused in_proj
    on their own checkpoints: separate (FusionBench's), or fused on FusionBench's family."""
    if report.get("qkv") == "separate":
        return ", separate q/k/v"
    return ", fused q/k/v" if report.get("checkpoint_family") == "fusionbench" else ""


def key_set_part(report: dict) -> str:
    # the global quantiles' keys where they are not the whole model (the fusionbench family)
    return ", vision-tower quantiles" if report.get("key_set") == "vision_model" else ""


def merge_name(report: dict) -> str:
    # data-free reports name their merge `merge`; Surgery reports name their base's merge `base`
    return str(report.get("merge") or report.get("base") or "")


def declared_method(report: dict):
    """The declared method of a report's run (its `method` is a method's name or a Surgery base
    name), or None for a method this process has not declared."""
    return registry.declared(str(report.get("method", "")))


def uses_task_identity(report: dict) -> bool:
    """Whether task t was evaluated with its own reconstructed model (EMR, TSV-C, TALL masks)."""
    if "task_identity" in report:
        return bool(report["task_identity"])
    method = declared_method(report)
    return bool(method and method.task_identity(report))


def method_label(report: dict) -> str:
    """What a report's run was, e.g. `task_arithmetic (λ 0.3) + Surgery v1`,
    `ties_merging (dis-sum, K 0.2, λ 0.3)`, `consensus (k 2, α 0.65 on val)`; † marks task identity.

    The method's declaration (runs/registry.py) writes it from the report's own fields (what the
    run actually used), never from defaults; it never raises: a report it cannot read, or of a
    method this process has not declared, is labelled with the method's name."""
    declared = declared_method(report)
    try:
        label = declared.label(report) if declared else str(report.get("method", "?"))
    except (KeyError, TypeError, ValueError, AttributeError):
        label = str(report.get("method", "?"))  # a report of another version: its method's name
    return label + (" †" if uses_task_identity(report) else "") + surgery_suffix(report)


def surgery_suffix(report: dict) -> str:
    """` + Surgery v1`, ` + Surgery v1 online`, ` + SurgeryV2`, or "" for a run without Surgery."""
    surgery = report.get("surgery")
    if not surgery:
        return ""
    if surgery == "v2":
        return " + SurgeryV2"
    return f" + Surgery {surgery}" + (" online" if report.get("online") else "")
