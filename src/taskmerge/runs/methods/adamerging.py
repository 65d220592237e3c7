"""AdaMerging(++): task-/layer-wise coefficients learned by entropy minimisation on unlabelled test
images (METHODS.md §2.4); the training lives in adaptive/, its wiring in runs/adaptive.py."""
from __future__ import annotations

import os

from taskmerge.runs.adaptive import adamerging_encoder
from taskmerge.runs.registry import Method, declare
from taskmerge.runs.script_configs import ADAMERGING, AdaMergingSettings, surgery_config
from taskmerge.storage.errors import ConfigError


def merge_adamerging(run, settings):
    raise ConfigError("AdaMerging learns its coefficients on the test images: run src/main_AdaMerging.py "
                      "(or use it as a Surgery base)")


def surgery_base(run, settings: AdaMergingSettings, images):
    """({task: the merged encoder}, the report's fields) of an AdaMerging Surgery base."""
    # its training settings (seed, resume_dir, checkpoint_every) are the run's: the whole config
    merged, info = adamerging_encoder(run, settings.method_name, run.config, images)
    if run.config.save_dir:
        run.save_merged(merged.merged_state_dict(), settings.method_name, info)
    base = merged.to_image_encoder()
    return {t: base for t in run.setup.tasks}, info


def label(report: dict) -> str:
    method = str(report.get("method"))
    source = report.get("coefficients_source")
    if source == "learn":
        steps = (report.get("config") or {}).get("adamerging_steps")
        return f"{method} (learned" + (f", {steps} steps)" if steps is not None else ")")
    if source == "published":
        return f"{method} (published coefficients)"
    if source:
        return f"{method} (coefficients {os.path.basename(str(source))})"
    return method


METHOD = declare(Method("adamerging", AdaMergingSettings, merge_adamerging, label,
                        script="main_AdaMerging.py",
                        bases={name: {"method_name": name} for name in ADAMERGING},
                        surgery_base=surgery_base,
                        derived=("adamerging_history", "adamerging_entropy", "coefficients_file",
                                 "coefficients_source")))
AdaMergingSurgeryConfig = surgery_config(METHOD)
