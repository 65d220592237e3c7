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


ADAMERGING_METHODS = ("tw_adamerging", "lw_adamerging", "tw_adamergingpp", "lw_adamergingpp")


def _num(value) -> str:
    """A coefficient as the scripts write it: 0.3, 0.65, 1.0 (grid values such as 1/30 to 4 digits)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    text = f"{value:.4g}"
    return text if any(c in text for c in ".en") else text + ".0"


def _on_val(report: dict) -> str:
    # a coefficient chosen on the <Task>Val splits leaves its search curve in the report
    return " on val" if report.get("val_curve") else ""


def _dare(report: dict) -> str:
    dare = report.get("dare")
    if not isinstance(dare, dict):
        return ""
    return f"DARE p {_num(dare.get('p'))}{'' if dare.get('rescale', True) else ' no rescale'}, "


def _qkv(report: dict) -> str:
    """How attention's q/k/v met a per-tensor method, where it is not the originals' fused in_proj
    on their own checkpoints: separate (FusionBench's), or fused on FusionBench's family."""
    if report.get("qkv") == "separate":
        return ", separate q/k/v"
    return ", fused q/k/v" if report.get("checkpoint_family") == "fusionbench" else ""


def _key_set(report: dict) -> str:
    # the global quantiles' keys where they are not the whole model (the fusionbench family)
    return ", vision-tower quantiles" if report.get("key_set") == "vision_model" else ""


def _pcb_label(report: dict) -> str:
    pcb = report["pcb"]
    if isinstance(pcb.get("search"), dict):
        lams = "λ_t searched on val" + (f" ({pcb['search'].get('budget')} merges)"
                                         if pcb["search"].get("budget") is not None else "")
    else:
        lams = f"fixed λ {_num(pcb.get('lam'))}"
    return f"pcb_merging (pcb_ES balancing, {lams}, r {_num(pcb.get('ratio'))}{_key_set(report)})"


def _merge_name(report: dict) -> str:
    # data-free reports name their merge `merge`; Surgery reports name their base's merge `base`
    return str(report.get("merge") or report.get("base") or "")


def _adamerging_label(method: str, report: dict) -> str:
    source = report.get("coefficients_source")
    if source == "learn":
        steps = (report.get("config") or {}).get("adamerging_steps")
        return f"{method} (learned" + (f", {steps} steps)" if steps is not None else ")")
    if source == "published":
        return f"{method} (published coefficients)"
    if source:
        return f"{method} (coefficients {os.path.basename(str(source))})"
    return method


def _base_label(method: str, report: dict) -> str:
    """The merge's label; `method` is the data-free method or the Surgery script's base name."""
    merge = _merge_name(report)
    if method in ADAMERGING_METHODS:
        return _adamerging_label(method, report)
    if method == "weight_averaging":
        return "weight_averaging (drop last)" if report.get("drop_last") else "weight_averaging"
    if method == "task_arithmetic" and "scaling_coef" in report:
        return f"task_arithmetic ({_dare(report)}λ {_num(report['scaling_coef'])}{_on_val(report)})"
    if method == "ties_merging" and isinstance(report.get("ties"), dict):
        ties = report["ties"]
        return (f"ties_merging ({_dare(report)}{ties.get('merge')}, K {_num(ties.get('k'))}, "
                f"λ {_num(report.get('scaling_coef'))}{_on_val(report)}{_key_set(report)})")
    if method in ("iso_merging", "iso_c", "iso_cts") and report.get("iso_method"):
        fraction = (f"f {_num(report['common_space_fraction'])}, "
                    if "common_space_fraction" in report else "")
        return (f"{report['iso_method']} ({fraction}α {_num(report.get('alpha'))}{_on_val(report)}"
                f"{_qkv(report)})")
    if method == "wudi_merging" and isinstance(report.get("wudi"), dict):
        wudi = report["wudi"]
        solver = (f"Adam {wudi.get('steps')} steps" if wudi.get("solver") == "adam"
                  else "closed form" + (f", ridge {_num(wudi['ridge'])}" if wudi.get("ridge") else ""))
        return f"wudi_merging ({wudi.get('preset')}, {solver}{_qkv(report)})"
    if method == "cart_merging" and isinstance(report.get("cart"), dict):
        cart = report["cart"]
        return f"cart_merging (λ {_num(cart.get('lam'))}, ρ {_num(cart.get('rank_ratio'))})"
    if method == "pcb_merging" and isinstance(report.get("pcb"), dict):
        return _pcb_label(report)
    if method == "emr_merging":
        qkv = _qkv(report) if report.get("rescaler") == "code" else ""
        return f"emr_merging ({report['rescaler']} rescaler{qkv})" if report.get("rescaler") else method
    if method == "tsv_merging":
        if merge == "TSVC":
            return "tsv_merging (TSVC)"
        alpha = _num(report.get("alpha"))
        return f"tsv_merging ({report.get('tsv_method')}, α {alpha}{_on_val(report)}{_qkv(report)})"
    if method in ("tall_masks", "consensus"):
        ties = "TIES τ_MTL, " if report.get("use_ties") else ""
        if merge.startswith("TALL_mask"):
            return f"tall_mask ({ties}λ per task on val{_key_set(report)})"
        if "prun_thre_k" in report:
            alpha = _num(report.get("alpha"))
            return (f"consensus ({ties}k {report['prun_thre_k']}, α {alpha}{_on_val(report)}"
                    f"{_key_set(report)})")
    return method


def uses_task_identity(report: dict) -> bool:
    """Whether task t was evaluated with its own reconstructed model (EMR, TSV-C, TALL masks)."""
    if "task_identity" in report:
        return bool(report["task_identity"])
    merge = _merge_name(report)
    return merge.startswith(("emr_", "TALL_mask")) or merge == "TSVC"


def method_label(report: dict) -> str:
    """What a report's run was, e.g. `task_arithmetic (λ 0.3) + Surgery v1`,
    `ties_merging (dis-sum, K 0.2, λ 0.3)`, `consensus (k 2, α 0.65 on val)`; † marks task identity.

    Read from the report's own fields (what the run actually used), never from defaults, and never
    raises: a field it does not know leaves the label at the method's name."""
    method = str(report.get("method", "?"))
    return (_base_label(method, report) + (" †" if uses_task_identity(report) else "")
            + surgery_suffix(report))


def surgery_suffix(report: dict) -> str:
    """` + Surgery v1`, ` + Surgery v1 online`, ` + SurgeryV2`, or "" for a run without Surgery."""
    surgery = report.get("surgery")
    if not surgery:
        return ""
    if surgery == "v2":
        return " + SurgeryV2"
    return f" + Surgery {surgery}" + (" online" if report.get("online") else "")
