"""Run logs in the originals' line format, and a JSON report beside each log.

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

from taskmerge.storage import atomic


def log_path(log_dir: str, subfolder: str, model_name: str, script_stem: str, method: str,
             timestamp: str | None = None) -> str:
    """`<log_dir>/<subfolder>/<model>/log_<script>_<method>_<model>_<time>.txt`, claimed for this run.

    The name is taken by creating the file exclusively, so two runs started in the same second
    (two variants of one script side by side) get two logs, the later with a `_2` suffix, instead
    of one overwriting the other."""
    timestamp = timestamp or datetime.now().strftime("%Y%m%d_%H%M%S")
    folder = os.path.join(log_dir, subfolder, model_name)
    os.makedirs(folder, exist_ok=True)
    stem = f"log_{script_stem}_{method}_{model_name}_{timestamp}"
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
        self.echo = echo
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
