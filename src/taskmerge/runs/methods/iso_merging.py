"""Iso-C and Iso-CTS: isotropic spectra of the task matrices (METHODS_RECORDS.md)."""
from __future__ import annotations

from dataclasses import dataclass

from taskmerge import merging
from taskmerge.compute.devices import resolve_device
from taskmerge.merging.iso import EARLY_STOPPING_PATIENCE
from taskmerge.merging.iso import METHODS as ISO_METHODS
from taskmerge.merging.task_vectors import apply
from taskmerge.runs.data_free import Merge, Run, attention_layout, qkv_field, qkv_mode, qkv_suffix
from taskmerge.runs.registry import Method, declare
from taskmerge.runs.reporting import num, on_val, qkv_part
from taskmerge.runs.script_configs import QKV_SETTINGS, merge_config, surgery_config
from taskmerge.runs.settings import setting


@dataclass
class IsoMerge:
    method: str = setting(choices=ISO_METHODS)
    common_space_fraction: float = setting(ge=0.0, le=1.0)
    alpha: float = setting(finite=True)
    select_on_val: bool = setting()
    merge_device: str = setting(nonempty=True)   # where the SVDs run: "cpu" | "auto" | "cuda[:i]"
    qkv: str = setting(choices=QKV_SETTINGS)


def merge_iso(run: Run, s: IsoMerge) -> Merge:
    method, qkv = s.method, qkv_mode(run, s.qkv)
    pretrained, experts = run.experts()
    run.log.info(attention_layout(run, qkv))
    device = resolve_device(s.merge_device)
    run.log.info(f"Iso decompositions on {device}")
    delta = merging.iso_delta(pretrained, experts, method, s.common_space_fraction, validate_inputs=False,
                              device=device, qkv=qkv)
    if s.select_on_val:
        alpha, curve = run.select(merging.ISO_ALPHA_GRID, lambda a: apply(pretrained, delta, a),
                                  EARLY_STOPPING_PATIENCE)
    else:
        alpha, curve = s.alpha, None
    run.log.info(f"alpha:{alpha}")
    fraction = {"common_space_fraction": s.common_space_fraction} if method == "iso_cts" else {}
    return Merge(f"{method}_{alpha}{qkv_suffix(qkv)}", apply(pretrained, delta, alpha),
                 extra={"iso_method": method, **fraction, **qkv_field(qkv), "alpha": alpha,
                        "val_curve": curve})


def label(report: dict) -> str:
    fraction = (f"f {num(report['common_space_fraction'])}, " if "common_space_fraction" in report else "")
    return (f"{report['iso_method']} ({fraction}α {num(report.get('alpha'))}{on_val(report)}"
            f"{qkv_part(report)})")


METHOD = declare(Method("iso_merging", IsoMerge, merge_iso, label, script="main_IsoMerging.py",
                        bases={"iso_c": {"method": "iso_c"}, "iso_cts": {"method": "iso_cts"}},
                        coefficient_keys=("alpha",)))
IsoMergingConfig = merge_config(METHOD)
IsoMergingSurgeryConfig = surgery_config(METHOD)
