"""Task Singular Vectors: TSV-M / TSVM_2 (one merged model) and TSV-C (per task, compressed)."""
from __future__ import annotations

from dataclasses import dataclass

from taskmerge import merging
from taskmerge.compute.devices import resolve_device
from taskmerge.merging.task_vectors import apply
from taskmerge.merging.tsv import METHODS as TSV_METHODS
from taskmerge.runs.data_free import (Merge, Run, attention_layout, chosen_coefficient, qkv_field, qkv_mode,
                                      qkv_suffix)
from taskmerge.runs.registry import Method, declare
from taskmerge.runs.reporting import merge_name, num, on_val, qkv_part
from taskmerge.runs.script_configs import QKV_SETTINGS, VAL_GRIDS, merge_config, surgery_config
from taskmerge.runs.settings import setting
from taskmerge.storage.errors import ConfigError


@dataclass
class TSVMerge:
    method: str = setting(choices=TSV_METHODS + ("TSVC",))
    alpha: float = setting(finite=True)
    select_on_val: bool = setting()
    val_grid: str = setting(choices=VAL_GRIDS)
    merge_device: str = setting(nonempty=True)   # where the SVDs run: "cpu" | "auto" | "cuda[:i]"
    qkv: str = setting(choices=QKV_SETTINGS)

    def check_together(self):
        if self.method == "TSVC" and self.qkv == "separate":
            raise ConfigError("setting qkv='separate' is not allowed with method='TSVC': FusionBench has "
                              "no TSV-C (its TaskSingularVectorCompression raises NotImplementedError), "
                              "so TSV-C keeps the original's fused in_proj (set qkv='auto' or 'fused')")


def merge_tsv(run: Run, s: TSVMerge) -> Merge:
    method = s.method
    pretrained, experts = run.experts()
    device = resolve_device(s.merge_device)
    run.log.info(f"TSV decompositions on {device}")
    if method == "TSVC":  # FusionBench has no TSV-C: the original's fused in_proj on every family
        run.log.info(attention_layout(run, "fused"))
        tsvc = merging.tsv_compress(pretrained, experts, validate_inputs=False, device=device)
        return Merge("TSVC", tsvc, per_task=True, extra={"alpha": 1.0, "storage": tsvc.storage_report()})
    qkv = qkv_mode(run, s.qkv)
    run.log.info(attention_layout(run, qkv))
    delta = merging.tsv_delta(pretrained, experts, method, validate_inputs=False, device=device, qkv=qkv)
    alpha, curve = chosen_coefficient(run, s.alpha, s.select_on_val, s.val_grid, delta)
    return Merge(f"{method}_{alpha}{qkv_suffix(qkv)}", apply(pretrained, delta, alpha),
                 extra={"tsv_method": method, **qkv_field(qkv), "alpha": alpha, "val_curve": curve})


def label(report: dict) -> str:
    if merge_name(report) == "TSVC":
        return "tsv_merging (TSVC)"
    alpha = num(report.get("alpha"))
    return f"tsv_merging ({report.get('tsv_method')}, α {alpha}{on_val(report)}{qkv_part(report)})"


METHOD = declare(Method("tsv_merging", TSVMerge, merge_tsv, label, script="main_TSVMerging.py",
                        bases={"tsv_merging": {}},
                        task_identity=lambda report: merge_name(report) == "TSVC",
                        coefficient_keys=("alpha",)))
TSVMergingConfig = merge_config(METHOD)
TSVMergingSurgeryConfig = surgery_config(METHOD)
