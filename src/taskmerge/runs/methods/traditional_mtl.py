"""Traditional MTL: one encoder fine-tuned jointly on every task's training split (the seeds' tables'
reference row, METHODS.md §6.1); the loop and the recipes live in adaptive/multitask.py.

The trained encoder is cached in `<cache folder>/traditional_mtl/`, keyed by what it depends on
(θ0, the heads, the training data, the resolved recipe and the seed), so a second run, a Surgery
run on this base or an evaluation (eval_single_task.py `model_file`) does not train it again.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass

from taskmerge.adaptive.adaptation_data import TaskImages
from taskmerge.adaptive.multitask import FUSIONBENCH, MultiTaskRecipe, experts_recipe, train_multitask
from taskmerge.compute import distributed
from taskmerge.datasets.errors import DatasetLayoutError
from taskmerge.runs.data_free import Merge, Run
from taskmerge.runs.identity import as_json, data_identity, head_digest, short_hash
from taskmerge.runs.registry import Method, declare
from taskmerge.runs.script_configs import merge_config, surgery_config
from taskmerge.runs.settings import setting
from taskmerge.runs.setup import MAX_PRELOAD_BYTES, fresh_encoder, task_data
from taskmerge.storage import atomic
from taskmerge.storage.checkpoints import file_digest
from taskmerge.storage.errors import ConfigError

RECIPES = ("auto", "fusionbench", "experts")
RECIPE_NAMES = {"fusionbench": "FusionBench recipe", "experts": "experts' recipe"}


@dataclass
class TraditionalMTLSettings:
    mtl_recipe: str = setting(choices=RECIPES)   # "auto": the experts' on the embedded benchmark, else
                                                 # FusionBench's
    mtl_steps: int = setting(ge=1, words=("auto",))          # "auto": the recipe's
    mtl_batch_size: int = setting(ge=1, words=("auto",))     # per task per step; "auto": the recipe's
    mtl_lr: float = setting(gt=0.0, finite=True, words=("auto",))
    mtl_weight_decay: float = setting(ge=0.0, finite=True, words=("auto",))
    # the training run's own (the names of runs/script_configs.TrainingRunConfig, which a Surgery run shares)
    seed: int = setting(ge=0)
    resume_dir: str = setting()                  # "" disables resuming
    checkpoint_every: int = setting(ge=1)


def resolve_recipe(run: Run, s: TraditionalMTLSettings) -> tuple[str, MultiTaskRecipe]:
    """(the recipe's name, the recipe with the settings' overrides)."""
    manifest = os.path.join(run.setup.model_dir, "manifest.json")
    finetune = None
    if run.setup.embedded and os.path.exists(manifest):
        try:
            with open(manifest) as f:
                finetune = json.load(f)["recipe"]["finetune"]
        except (OSError, ValueError, KeyError, TypeError):
            finetune = None
    name = s.mtl_recipe
    if name == "auto":
        name = "experts" if finetune is not None else "fusionbench"
    if name == "experts" and finetune is None:
        raise ConfigError(f"setting mtl_recipe='experts': the experts' fine-tuning recipe is known only "
                          f"for the embedded benchmark (its manifest.json), not {run.setup.model_dir}; "
                          f"use mtl_recipe='fusionbench' (or 'auto')")
    recipe = experts_recipe(finetune) if name == "experts" else FUSIONBENCH
    overrides = {"steps": s.mtl_steps, "batch_size": s.mtl_batch_size, "lr": s.mtl_lr,
                 "weight_decay": s.mtl_weight_decay}
    recipe = dataclasses.replace(recipe, **{k: v for k, v in overrides.items() if v != "auto"})
    return name, recipe


def train_splits(run: Run) -> dict:
    """Every task's training split (one DatasetLayoutError naming a task that has none)."""
    splits = {}
    for t in run.setup.tasks:
        data = task_data(run.setup, t)
        if data.train is None or len(data.train) == 0:
            folder = data.info.get("root") or run.setup.data_location
            raise DatasetLayoutError(f"{t}: no training split under {folder} (Traditional MTL trains on "
                                     f"every task's training split); add the task's train data there, "
                                     f"or leave {t} out of `tasks`")
        splits[t] = data.train
    return splits


def _train_images(run: Run, splits: dict) -> dict[str, TaskImages]:
    """The training splits, preloaded as tensors while they fit in MAX_PRELOAD_BYTES together, the
    rest read per batch by the run's loader workers."""
    loader, left, images = run.setup.loader, MAX_PRELOAD_BYTES, {}
    for t, ds in splits.items():
        first = ds[0][0]
        size = first.numel() * first.element_size() * len(ds)
        preload = size <= left
        left -= size if preload else 0
        images[t] = TaskImages(ds, preload=preload, num_workers=loader.num_workers,
                               name=f"{t} (train)", pin_memory=loader.pin_memory)
    return images


def _load_cached(path: str):
    """(state dict, {"losses", "grad_norms"}) of a cached encoder, or None if it cannot be read (it is
    then trained again and replaced)."""
    from safetensors import safe_open
    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata()
            history = {"losses": json.loads(meta["losses"]), "grad_norms": json.loads(meta["grad_norms"])}
            return {k: f.get_tensor(k) for k in f.keys()}, history
    except Exception:  # truncated, foreign or unreadable: retrain and replace it
        return None


def merge_traditional_mtl(run: Run, s: TraditionalMTLSettings) -> Merge:
    setup, tasks = run.setup, run.setup.tasks
    name, recipe = resolve_recipe(run, s)
    splits = train_splits(run)
    key = as_json({"model": setup.model_name, "pretrained": file_digest(setup.checkpoints.zeroshot_path),
                   "heads": {t: head_digest(run.heads[t]) for t in tasks},
                   "data": {t: data_identity(t, "train", setup.data_location, splits[t]) for t in tasks},
                   "recipe": dataclasses.asdict(recipe), "seed": s.seed})
    path = os.path.join(setup.cache_dir, "traditional_mtl", f"traditional_mtl_{short_hash(key)}.safetensors")
    run.log.info(f"Traditional MTL: {RECIPE_NAMES[name]} {dataclasses.asdict(recipe)}, seed {s.seed}, "
                 f"{len(tasks)} tasks, the sum of the tasks' mean cross-entropies per step")
    cached = _load_cached(path) if os.path.exists(path) else None
    if cached is None and os.path.exists(path):
        run.log.info(f"Traditional MTL: {path} cannot be read (truncated or foreign); training again, "
                     f"it will be replaced")
    if cached is not None:
        state_dict, history = cached
        source = "cache"
        run.log.info(f"Traditional MTL: loaded the trained encoder from {path} (not trained again)")
    else:
        encoder = fresh_encoder(setup, setup.checkpoints.pretrained())
        result = train_multitask(encoder, tasks, _train_images(run, splits), run.heads, recipe,
                                 seed=s.seed, checkpoint_dir=s.resume_dir or None,
                                 checkpoint_every=s.checkpoint_every, run_key=key, logger=run.log,
                                 device=setup.device, num_workers=setup.loader.num_workers,
                                 pin_memory=setup.loader.pin_memory)
        state_dict = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
        history, source = {"losses": result.losses, "grad_norms": result.grad_norms}, "trained"
        atomic.save_safetensors(state_dict, path, metadata={
            "method": "traditional_mtl", "model": setup.model_name, "key": json.dumps(key),
            **{k: json.dumps(v) for k, v in history.items()}})
        distributed.barrier()  # the file is whole before any rank may look for it again
        run.log.info(f"Traditional MTL: trained {recipe.steps} steps (loss {result.losses[0]:.4f} → "
                     f"{result.losses[-1]:.4f}); saved the encoder to {path}")
    info = {"mtl": as_json({"recipe": name, **dataclasses.asdict(recipe), "seed": s.seed}),
            "mtl_history": history["losses"], "mtl_grad_norms": history["grad_norms"],
            "mtl_source": source, "mtl_file": path}
    return Merge(f"traditional_mtl_{name}_{recipe.steps}", state_dict, extra=info)


def label(report: dict) -> str:
    mtl = report["mtl"]
    return f"Traditional MTL ({RECIPE_NAMES.get(mtl['recipe'], mtl['recipe'])}, {mtl['steps']} steps)"


METHOD = declare(Method("traditional_mtl", TraditionalMTLSettings, merge_traditional_mtl, label,
                        script="main_TraditionalMTL.py", bases={"traditional_mtl": {}},
                        derived=("mtl_history", "mtl_grad_norms", "mtl_source", "mtl_file")))
TraditionalMTLConfig = merge_config(METHOD)
TraditionalMTLSurgeryConfig = surgery_config(METHOD)
