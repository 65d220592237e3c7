"""The data-dependent entry scripts: AdaMerging, and Surgery v1 / online / SurgeryV2 on any base.

A Surgery base is any Surgery base name a declared method answers to (runs/registry.py: WA, TA and
TIES with or without DARE, EMR, TSV-M, Consensus, Iso-C, Iso-CTS, WUDI, CART, PCB, and task-/layer-
wise AdaMerging(++) with published, saved or freshly learned coefficients). Its fixed
encoder (one per task for EMR/TSV-C/TALL) gives the features the modules are trained on; the
experts' features are cached on disk (keyed by checkpoint digest), so a second run never touches
the experts again.
"""
from __future__ import annotations

import os
from dataclasses import asdict
from typing import Mapping

from taskmerge import merging
from taskmerge.adaptive.adamerging import AdaMergingConfig, train_adamerging
from taskmerge.adaptive.adamerging_coefficients import (PUBLISHED_PATH, find_saved, load_coefficients,
                                                        load_published, save_coefficients, saved_path)
from taskmerge.adaptive.adaptation_data import TaskImages
from taskmerge.adaptive.feature_cache import FeatureCache, base_and_expert_features
from taskmerge.adaptive.functional_merge import MergedEncoder
from taskmerge.adaptive.representation_bias import bias_report, draw_representation_bias
from taskmerge.adaptive.surgery import SurgeryConfig, corrected_features, train_surgery, train_surgery_online
from taskmerge.adaptive.surgery_v2 import train_surgery_v2
from taskmerge.compute import distributed
from taskmerge.merging.task_vectors import task_vector
from taskmerge.models.encoders import build_image_encoder
from taskmerge.runs import registry
from taskmerge.runs.data_free import Run, flattened_keys
from taskmerge.runs.identity import (checkpoint_digests, data_identity, head_digest, merge_settings,
                                     tensor_digest)
from taskmerge.runs.script_configs import ADAMERGING, AdaMergingRunConfig, SurgeryRunConfig
from taskmerge.runs.settings import subset
from taskmerge.runs.setup import task_data
from taskmerge.runs.validation import check_finite_model, check_merged
from taskmerge.storage.checkpoints import file_digest
from taskmerge.storage.errors import ConfigError


def _adamerging_config(config: AdaMergingRunConfig, eval_batch_size: int) -> AdaMergingConfig:
    return AdaMergingConfig(steps=config.adamerging_steps, lr=config.adamerging_lr,
                            eval_every=config.adamerging_eval_every, checkpoint_every=config.checkpoint_every,
                            seed=config.seed, eval_batch_size=eval_batch_size)


def task_images(run: Run) -> dict[str, TaskImages]:
    """Each task's (unlabelled) test images, loaded once for the whole run."""
    loader = run.setup.loader
    return {t: TaskImages(task_data(run.setup, t).test, name=t, num_workers=loader.num_workers,
                          pin_memory=loader.pin_memory) for t in run.setup.tasks}


def adamerging_encoder(run: Run, method: str, config: AdaMergingRunConfig,
                       images=None) -> tuple[MergedEncoder, dict]:
    """The MergedEncoder of `method` with its coefficients: published (real models, task_vectors'
    experts), loaded from a file, or learned now by entropy minimisation ("auto": published, else
    saved, else learn)."""
    mode, plus_plus = ADAMERGING[method]
    setup, tasks = run.setup, run.setup.tasks
    source = config.coefficients
    if source == "published" and not _published_exists(method, setup):
        origin = setup.checkpoints.origin
        why = (f"the published tables were learned on task_vectors' experts, these are {origin}'s"
               if _published_exists(method, setup, any_origin=True)
               else f"there is no published {method} table for {setup.model_name}")
        raise ConfigError(f"setting coefficients='published': {why}; use coefficients='learn' "
                          f"(or 'auto', or a saved .json)")
    pretrained, experts = run.experts()
    theta0 = dict(pretrained.items())
    key_set = {}
    if plus_plus:  # TIES' global quantile: over what FusionBench flattens on its family (data_free)
        keys, key_set = flattened_keys(run)
        selected = merging.ties_selected(pretrained, experts, k=0.2, validate_inputs=False, keys=keys)
        vectors = [selected[t] for t in tasks]
    else:
        vectors = [lambda t=t: task_vector(pretrained, experts[t]).materialize() for t in tasks]
    merged = MergedEncoder(build_image_encoder(setup.arch), theta0, vectors, mode=mode,
                           init=config.prior, clamp=config.clamp, device=setup.device)
    key = {**coefficients_key(run, method, merged, _adamerging_config(config, run.batch_size)), **key_set}
    folder = os.path.join(setup.cache_dir, "adamerging")
    if source == "auto":
        saved, why = find_saved(folder, method, key)
        if _published_exists(method, setup):
            source = "published"
        elif saved is not None:
            source = saved
        else:
            run.log.info(f"AdaMerging {method}: no saved coefficients learned from these inputs ({why})")
            source = "learn"
    run.log.info(f"AdaMerging {method}: coefficients from {source}")
    info = {"adamerging": method, "coefficients_source": source, **key_set}
    if source == "published":
        merged.load_table(load_published(method, setup.model_name), tasks)
    elif source == "learn":
        result = train_adamerging(merged, tasks, images or task_images(run), run.heads,
                                  _adamerging_config(config, run.batch_size), logger=run.log,
                                  checkpoint_dir=config.resume_dir or None,
                                  run_key=key, device=setup.device)
        names = merged.param_names if mode == "layer" else None
        saved = saved_path(folder, method, key)
        save_coefficients(saved, result.coefficients, method=method, model_name=setup.model_name,
                          tasks=tasks, param_names=names, key=key)
        run.log.info(f"Saved learned coefficients to {saved}")
        info.update(adamerging_history=result.history, adamerging_entropy=result.losses[-1:],
                    coefficients_file=saved)
    else:
        merged.load_table(load_coefficients(source), tasks)
    info["coefficients_digest"] = tensor_digest(merged.coefficient_rows())
    check_finite_model(merged.merged_state_dict(), f"AdaMerging {method} (coefficients from {source})",
                       "check the coefficients and the experts")
    return merged, info


def _published_exists(method: str, setup, any_origin: bool = False) -> bool:
    """Whether a published table fits: the paper learned it on task_vectors' experts of this model, so
    it does not carry over to tall_masks' or FusionBench's re-fine-tunes of the same tasks."""
    import json
    if not any_origin and setup.checkpoints.origin != "task_vectors":
        return False
    with open(PUBLISHED_PATH) as f:
        return f"{method}/{setup.model_name}" in json.load(f)["coefficients"]


def _run_key(run: Run, method: str) -> dict:
    """The inputs every adaptive run depends on: model, checkpoints, heads and test data."""
    setup = run.setup
    return {"method": method, "model": setup.model_name,
            "checkpoints": checkpoint_digests(setup.checkpoints),
            "heads": {t: head_digest(run.heads[t]) for t in setup.tasks},
            "data": {t: data_identity(t, "test", setup.data_location, task_data(setup, t).test)
                     for t in setup.tasks}}


def coefficients_key(run: Run, method: str, merged: MergedEncoder, cfg: AdaMergingConfig) -> dict:
    """What learned coefficients depend on: the run's inputs, the starting coefficients (`prior`),
    whether λ is clamped, and the training settings (steps, lr, seed, batches; not how often it
    evaluates or saves)."""
    return {**_run_key(run, method), "prior": tensor_digest(merged.lam_raw),  # λ before training
            "clamp": merged.clamp,
            "adamerging": {k: v for k, v in asdict(cfg).items()
                           if k not in ("eval_every", "checkpoint_every", "eval_batch_size")}}


def run_adamerging(config: AdaMergingRunConfig, script: str) -> dict:
    """Task-/layer-wise AdaMerging(++): learn (or load) the coefficients, evaluate, report."""
    method = config.method_name
    run = Run(config, script, method, subfolder="adamerging")
    merged, info = adamerging_encoder(run, method, config)
    state_dict = merged.merged_state_dict()
    run.save_merged(state_dict, method, info)
    accs = run.evaluate(state_dict)
    run.log.eval_step("final", accs)
    return run.finish(accs, coefficients=merged.coefficient_rows().tolist(), **info)


def base_settings(config: SurgeryRunConfig):
    """(the declared method of the config's Surgery base, its settings from the config's fields).
    A setting the base's name fixes (the `iso_cts` base is Iso with method="iso_cts") must not be
    set otherwise."""
    method, fixed = registry.base(config.method_name)
    for name, value in fixed.items():
        if getattr(config, name, value) != value:
            raise ConfigError(f"setting {name}={getattr(config, name)!r} contradicts method_name="
                              f"{config.method_name!r}, which means {name}={value!r} (set one or the other)")
    return method, subset(method.settings, config, f"the {config.method_name} base's settings", fixed)


def base_encoders(run: Run, method_name: str, config: SurgeryRunConfig, images) -> tuple[dict, dict]:
    """{task: fixed base ImageEncoder} for a Surgery base, and what to report about it."""
    tasks = run.setup.tasks
    method, settings = base_settings(config)
    if method.surgery_base is not None:  # learned on the test images (AdaMerging)
        return method.surgery_base(run, settings, images)
    merge = method.merge(run, settings)
    pretrained, _ = run.experts()
    # Checked before it is saved: a NaN model is refused with nothing written.
    check_merged(merge.name, merge.model, merge.per_task, merge.extra, pretrained, tasks,
                 method.coefficient_keys)
    run.save_merged(merge.model, merge.name, merge.extra)
    if merge.per_task:  # EMR / TSV-C / TALL: task t's modules sit on task t's own model
        return _TaskEncoders(run.setup.arch, merge.model, pretrained, tasks), {"base": merge.name, **merge.extra}
    base = build_image_encoder(run.setup.arch, merge.model)
    return {t: base for t in tasks}, {"base": merge.name, **merge.extra}


def surgery_rank(rank: int | str, surgery: str, arch: str) -> int:
    """The module rank; "auto" is the originals' per model: RepresentationSurgery's 16 for v1, and
    SurgeryV2's 16 for ViT-B/32 and B/16 but 4 for ViT-L/14 (EnnengYang/SurgeryV2
    src/main_tv_surgery_v2.py)."""
    if rank != "auto":
        return rank
    return 4 if surgery == "v2" and arch.startswith("ViT-L") else 16


class _TaskEncoders(Mapping):
    """{task: its own reconstructed encoder}, built when asked for: Surgery v1 reads each once (its
    features), so only one of the T models is alive at a time; SurgeryV2 runs them every step and
    keeps all T."""

    def __init__(self, arch, per_task_model, pretrained, tasks):
        self.arch, self.model, self.pretrained, self.tasks = arch, per_task_model, pretrained, list(tasks)

    def __getitem__(self, task):
        if task not in self.tasks:
            raise KeyError(task)
        return build_image_encoder(self.arch, self.model.task_state_dict(self.pretrained, task))

    def __iter__(self):
        return iter(self.tasks)

    def __len__(self):
        return len(self.tasks)


def base_identity(method: str, base_info: dict) -> dict:
    """What fixes a Surgery base's weights: AdaMerging's actual coefficients (learned, saved or
    published alike), or a data-free merge's method, settings and chosen coefficient."""
    if "coefficients_digest" in base_info:
        return {"adamerging": method, "coefficients": base_info["coefficients_digest"]}
    return {"base": base_info.get("base", method),
            "settings": merge_settings(base_info, registry.derived_fields(method))}


def run_surgery(config: SurgeryRunConfig, script: str) -> dict:
    """Representation Surgery on a fixed base: v1 (final feature), its online variant, or
    SurgeryV2 (every block); logs the originals' lines and reports the representation bias."""
    method, version, online = config.method_name, config.surgery, config.online
    subfolder = "online" if online else ("Surgery" if version == "v2" else "run")
    run = Run(config, script, method, subfolder=subfolder)
    setup, tasks = run.setup, run.setup.tasks
    images = task_images(run)
    bases, base_info = base_encoders(run, method, config, images)
    cache = FeatureCache(config.feature_cache or os.path.join(setup.cache_dir, "feature_cache"),
                         log=run.log.info)
    ckpt = setup.checkpoints
    base_feats, expert_feats = {}, {}
    for t in tasks:
        base_feats[t], expert_feats[t] = base_and_expert_features(
            bases[t], cache, lambda t=t: build_image_encoder(setup.arch, ckpt.finetuned(t)), images[t],
            model_name=setup.model_name, checkpoint_digest=file_digest(ckpt.finetuned_path(t)),
            dataset_id=f"{t}/test@{os.path.abspath(setup.data_location)}"
                       + ("@parquet" if setup.data_format == "parquet" and not setup.embedded else "")
                       # the images as preprocessed (the fusionbench family's differ from open_clip's)
                       + (f"@{setup.preprocessing}" if setup.family == "fusionbench" else ""),
            batch_size=run.batch_size, device=setup.device)
    rank = surgery_rank(config.rank, version, setup.arch)
    scfg = SurgeryConfig(rank=rank, iterations=config.iterations, lr=config.lr,
                         eval_every=config.eval_iterations, checkpoint_every=config.checkpoint_every,
                         zero_grad_mode=config.zero_grad_mode, seed=config.seed,
                         eval_batch_size=run.batch_size)
    labels = {t: images[t].labels for t in tasks}
    key = {**_run_key(run, method), "base": base_identity(method, base_info), "surgery": version,
           "online": online}
    common = dict(logger=run.log, checkpoint_dir=config.resume_dir or None, run_key=key,
                  device=setup.device)
    run.log.info(f"Surgery {version}{' online' if online else ''} on {method}: rank {scfg.rank}"
                 f"{' (rank=auto for ' + setup.arch + ')' if config.rank == 'auto' else ''}, "
                 f"zero_grad_mode={scfg.zero_grad_mode!r}")
    if distributed.active():
        run.log.info(f"Surgery on {distributed.world_size()} ranks: the frozen parts (base and expert "
                     f"features, targets, evaluation passes) are sharded; the training is not split, "
                     f"since one Adam couples every task's module (and with zero_grad_mode='zero' each "
                     f"step moves every module used before), so every rank takes the same Adam steps "
                     f"and rank 0's modules are broadcast before each evaluation")
    if version == "v2":
        result = train_surgery_v2(tasks, bases, images, expert_feats, base_feats, run.heads, scfg, **common)
    elif online:
        result = train_surgery_online(tasks, base_feats, expert_feats, labels, run.heads, scfg, **common)
    else:
        result = train_surgery(tasks, base_feats, expert_feats, labels, run.heads, scfg, **common)
    stage = f"surgery_{version}" + ("_online" if online else "")
    if online:  # each task was evaluated at its own 100 %; gather them as one final round
        run.log.eval_step("final", result.final_accs)
    if not result.corrected:  # the online trainer keeps no features: correct them once, at the end
        finals = corrected_features(result.adapters, {t: base_feats[t]["final"] for t in tasks})
        result.corrected = {t: {"final": finals[t], "blocks": base_feats[t]["blocks"]} for t in tasks}
    bias = bias_report(expert_feats, {"merged": base_feats, stage: result.corrected})
    png = os.path.splitext(run.log.path)[0] + ".png"
    draw_representation_bias(
        png, {"merged": bias["per_task"]["merged"], stage: bias["per_task"][stage]},
        {t: {"expert": expert_feats[t]["final"], "merged": base_feats[t]["final"],
             stage: result.corrected[t]["final"]} for t in tasks},
        title=f"{method} + {stage} ({setup.model_name})")
    run.log.info(f"Representation bias (mean L1 to the experts), final feature: "
                 f"merged {bias['average']['merged']['final']:.4f} → "
                 f"{stage} {bias['average'][stage]['final']:.4f}; figure {png}")
    base_accs = result.history[0]["accs"] if result.history and "accs" in result.history[0] else None
    return run.finish(result.final_accs, surgery=version, online=online, rank=scfg.rank,
                      zero_grad_mode=scfg.zero_grad_mode, base_accuracy=base_accs,
                      history=result.history, representation_bias=bias, figure=os.path.basename(png),
                      **base_info)
