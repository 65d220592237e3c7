"""EMR-Merging: elect, mask, rescale; each task's own model at inference (METHODS.md §2.5)."""
from __future__ import annotations

from dataclasses import dataclass

from taskmerge import merging
from taskmerge.merging.emr import RESCALERS
from taskmerge.runs.data_free import Merge, Run, qkv_field, qkv_mode, qkv_suffix
from taskmerge.runs.registry import Method, declare
from taskmerge.runs.reporting import qkv_part
from taskmerge.runs.script_configs import QKV_SETTINGS, merge_config, surgery_config
from taskmerge.runs.settings import setting


@dataclass
class EMRMerge:
    rescaler: str = setting(choices=RESCALERS)
    qkv: str = setting(choices=QKV_SETTINGS)   # the "code" rescaler's per-tensor means


def _tensors(qkv: str) -> str:
    return ("q, k and v as three tensors (FusionBench's CLIPVisionModel)" if qkv == "separate"
            else "the fused in_proj as one tensor (open_clip's, the original's)")


def merge_emr(run: Run, s: EMRMerge) -> Merge:
    pretrained, experts = run.experts()
    rescaler, qkv = s.rescaler, qkv_mode(run, s.qkv)
    if rescaler == "code":
        run.log.info(f"EMR rescaler: per-tensor means over {_tensors(qkv)}")
    emr = merging.emr_merging(pretrained, experts, rescaler=rescaler, validate_inputs=False, qkv=qkv)
    run.log.info(f"Rescalers ({rescaler}): "
                 + ", ".join(f"{t}: {float(r):.4f}" for t, r in zip(emr.tasks, emr.rescalers)))
    return Merge(f"emr_{rescaler}{qkv_suffix(qkv)}", emr, per_task=True,
                 extra={"rescaler": rescaler, **qkv_field(qkv),
                        "rescalers": dict(zip(emr.tasks, emr.rescalers.tolist())),
                        "storage": emr.storage_report()})


def label(report: dict) -> str:
    if not report.get("rescaler"):
        return str(report.get("method"))
    qkv = qkv_part(report) if report.get("rescaler") == "code" else ""
    return f"emr_merging ({report['rescaler']} rescaler{qkv})"


METHOD = declare(Method("emr_merging", EMRMerge, merge_emr, label, script="main_EMRMerging.py",
                        bases={"emr_merging": {}}, task_identity=lambda report: True,
                        coefficient_keys=("rescaler",)))
EMRMergingConfig = merge_config(METHOD)
EMRMergingSurgeryConfig = surgery_config(METHOD)
