"""A run of a data-free method: checkpoints, heads, data and log (`Run`), what a merge gives
(`Merge`), the helpers the methods' declarations share (DARE, the key set of global quantiles, the
q/k/v mode, a coefficient chosen on `<Task>Val`), and `run_data_free(config, script)`, what a
data-free entry script calls: the declared method's merge (runs/registry.py, runs/methods/),
evaluate every task, log and report. Surgery uses the same merges for its bases (runs/adaptive.py).
The merge math itself lives in `merging/`.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping

import torch

from taskmerge import merging
from taskmerge.merging.task_vectors import apply, merged_keys, numel_of
from taskmerge.compute import cpu_paths, distributed
from taskmerge.compute.devices import default_num_workers, default_threads, resolve_device, use_tf32
from taskmerge.runs.evaluation import LoaderSettings
from taskmerge.runs.identity import checkpoint_digests, merge_settings, short_hash
from taskmerge.runs.reporting import RunLogger, results_table
from taskmerge.runs import registry
from taskmerge.runs.script_configs import VAL_GRIDS, MergeRunConfig, RunConfig, SingleTaskEvalConfig
from taskmerge.runs.heads import load_heads
from taskmerge.runs.selection import select_coefficient
from taskmerge.runs.settings import setting
from taskmerge.runs.setup import (Setup, evaluate_tasks, finish_run, individual_accuracies,
                                  resolve_cache_dir, resolve_setup, start_run, validate_checkpoints)
from taskmerge.runs import validation
from taskmerge.runs.validation import check_merged
from taskmerge.storage.allocator import recycle_freed_memory
from taskmerge.storage.hf_checkpoints import vision_model_keys


class Run:
    """What one run carries between its steps: setup, log, heads, expert accuracies."""

    def __init__(self, config: RunConfig, script: str, method: str, subfolder: str = "merging"):
        self.config = config
        self.method = method
        device = resolve_device(config.device)
        distributed.init(device, rendezvous_timeout_s=config.rendezvous_timeout)
        use_tf32(config.tf32)
        self.setup: Setup = resolve_setup(config.model_name, config.checkpoint_dir,
                                          config.data_location, config.tasks or None,
                                          config.data_format, config.trust_label_order)
        workers = default_num_workers(device) if config.num_workers == "auto" else config.num_workers
        torch.set_num_threads(default_threads(device, self.setup.embedded) if config.threads == "auto"
                              else config.threads)
        self.setup.device, self.setup.loader = device, LoaderSettings.for_device(device, workers)
        self.setup.cache_root, cache_why = resolve_cache_dir(config.cache_dir, self.setup)
        # before any work, and before the log is opened
        validation.check_output_folders(config, {"cache_dir": self.setup.cache_dir})
        self.log: RunLogger = start_run(asdict(config), self.setup, script, method, subfolder,
                                        config.log_dir)
        if (self.setup.embedded and device.type == "cpu" and config.cpu_paths == "auto"
                and not cpu_paths.is_pinned()):
            self.log.info("CPU code paths: this machine's native ones (this process started without "
                          "compute/cpu_paths.PINNED, as a library call does): the last bits, and so "
                          "the numbers, may differ from README's; run the entry script to pin them")
        if self.setup.cache_dir != self.setup.model_dir:
            self.log.info(f"Caches (built heads, expert accuracies, coefficients, features) go to "
                          f"{self.setup.cache_dir} ({cache_why})")
        if distributed.active():
            self.log.info(f"torch.distributed: {distributed.world_size()} ranks over "
                          f"{distributed.backend()}; evaluation and features are sharded over them, "
                          f"only rank 0 writes files")
        self.batch_size = config.batch_size
        # the checkpoints first: one of another model is named in one line, before the heads'
        # text tower is loaded into the run's architecture
        validate_checkpoints(self.setup)
        self.heads = load_heads(self.setup, log=self.log.info)
        self.individual = individual_accuracies(self.setup, self.heads, self.batch_size, log=self.log.info)
        self._individual_val = None
        self._experts = None

    def experts(self):
        """θ0 and {task: θ_t} as lazy readers (validated in __init__, before any work)."""
        if self._experts is None:
            ckpt = self.setup.checkpoints
            self._experts = ckpt.pretrained(), {t: ckpt.finetuned(t) for t in self.setup.tasks}
        return self._experts

    def evaluate(self, state_dict, split: str = "test", per_task: bool = False) -> dict[str, float]:
        return evaluate_tasks(self.setup, state_dict, self.heads, self.batch_size, split, per_task)

    @property
    def individual_val(self) -> dict[str, float]:
        if self._individual_val is None:
            self._individual_val = individual_accuracies(self.setup, self.heads, self.batch_size, "val",
                                                         log=self.log.info)
        return self._individual_val

    def select(self, grid, merged_at: Callable[[float], Mapping[str, torch.Tensor]],
               patience: int | None = None) -> tuple[float, dict]:
        self.log.info(f"Choosing the coefficient on the <Task>Val splits over {list(grid)}"
                      + (f", stopping after {patience} without a better avg ACC" if patience else ""))
        best, curve = select_coefficient(grid, merged_at, lambda sd: self.evaluate(sd, "val"),
                                         self.individual_val, self.log.info, patience)
        self.log.info(f"Chosen coefficient: {best}")
        return best, {str(k): v for k, v in curve.items()}

    def save_merged(self, obj, name: str, extra: Mapping | None = None) -> str | None:
        """The merged model (or a per-task method's compact form) as safetensors, named by the
        method and a digest of the tasks, checkpoints and settings it came from (a 2-task and a
        4-task merge never share a file); a plain state dict also records them in its header."""
        save_dir = self.config.save_dir
        if not save_dir:
            return None
        provenance = {"method": name, "model": self.setup.model_name, "tasks": self.setup.tasks,
                      "checkpoints": checkpoint_digests(self.setup.checkpoints),
                      "settings": merge_settings(extra or {}, registry.derived_fields(self.method))}
        path = os.path.join(save_dir, self.setup.model_name,
                            f"{name}_{short_hash(provenance, 8)}.safetensors")
        if hasattr(obj, "save"):
            obj.save(path)
        else:
            from taskmerge.storage.atomic import save_safetensors
            save_safetensors(dict(obj), path, metadata={"method": name, "model": self.setup.model_name,
                                                        "provenance": json.dumps(provenance, default=str)})
        self.log.info(f"Saved {path}")
        return path

    def finish(self, accs: dict[str, float], **extra) -> dict:
        return finish_run(self.log, self.setup, self.method, accs, self.individual, **extra)


@dataclass
class Merge:
    """A method's result: one merged θ, or a per-task object (`task_state_dict(θ0, t)`)."""
    name: str
    model: object
    per_task: bool = False
    extra: dict = field(default_factory=dict)

    def state_dicts(self, pretrained) -> Mapping[str, Mapping[str, torch.Tensor]] | Mapping[str, torch.Tensor]:
        return _LazyTaskModels(self.model, pretrained) if self.per_task else self.model


class _LazyTaskModels(Mapping):
    """{task: θ_t} built on demand, so only one reconstructed model is alive at a time."""

    def __init__(self, obj, pretrained):
        self.obj, self.pretrained = obj, pretrained

    def __getitem__(self, task):
        return self.obj.task_state_dict(self.pretrained, task)

    def __iter__(self):
        return iter(self.obj.tasks)

    def __len__(self):
        return len(self.obj.tasks)


def chosen_coefficient(run: Run, coef: float, select_on_val: bool, val_grid: str, delta):
    """`coef`, or the coefficient chosen on validation over `val_grid` when `select_on_val`."""
    if not select_on_val:
        return coef, None
    pretrained, _ = run.experts()
    return run.select(VAL_GRIDS[val_grid], lambda c: apply(pretrained, delta, c))


@dataclass
class DareSettings:
    """DARE before TA or TIES: drop each task-vector entry with probability p, rescale by 1/(1 − p)."""
    dare_p: float = setting(ge=0.0, lt=1.0)    # 0: no DARE
    dare_rescale: bool = setting()
    dare_seed: int = setting(ge=0)


def dare_experts(run: Run, s: DareSettings):
    """(θ0, the experts, or their DARE drop-and-rescaled versions when dare_p > 0, the name prefix
    and the report's DARE fields); with dare_p = 0 nothing changes, the name and the keys included."""
    pretrained, experts = run.experts()
    if s.dare_p == 0.0:
        return pretrained, experts, "", {}
    dare = {"p": s.dare_p, "rescale": s.dare_rescale, "seed": s.dare_seed}
    run.log.info(f"DARE: each task-vector entry dropped with p={s.dare_p}"
                 f"{f', kept ones rescaled by 1/(1 − p)' if s.dare_rescale else ', no rescale'}, "
                 f"on every floating-point key, masks seeded by (seed {s.dare_seed}, task, key)")
    dropped = merging.drop_and_rescale(pretrained, experts, s.dare_p, s.dare_rescale, s.dare_seed,
                                       validate_inputs=False)
    return pretrained, dropped, f"dare_p{s.dare_p}_", {"dare": dare}


def flattened_keys(run: Run) -> tuple[list[str] | None, dict]:
    """(the keys a global quantile ranges over, the report's field): on the fusionbench family the
    keys FusionBench flattens, its CLIPVisionModel's state dict (`ties_merging.py` and
    `dare/ties_merging.py`: `state_dict_to_vector(model.state_dict(), remove_keys=[])`) — not the
    projection and text leftovers our conversion adds, whose zero task vectors would otherwise
    shift every quantile (K 20 % keeps 25.9 % of a B/32 vision tower); they keep θ0, as FusionBench
    keeps the pre-trained ones. Elsewhere every floating-point key, as the originals flatten the
    whole task_vectors checkpoint. The report names the key set only where it is the vision tower."""
    pretrained, _ = run.experts()
    every = merged_keys(pretrained)
    total = sum(numel_of(pretrained, k) for k in every)
    keys = vision_model_keys(pretrained) if run.setup.family == "fusionbench" else None
    if keys is None:
        run.log.info(f"Global quantiles over every floating-point key: {len(every)} keys, {total} "
                     f"entries (the original's flattened checkpoint)")
        return None, {}
    entries = sum(numel_of(pretrained, k) for k in keys)
    run.log.info(f"Global quantiles over the vision tower only, as FusionBench flattens its "
                 f"CLIPVisionModel: {len(keys)} of {len(every)} keys, {entries} of {total} entries; "
                 f"the other keys keep θ0")
    return keys, {"key_set": "vision_model"}


def qkv_mode(run: Run, qkv: str, fusionbench_preset: bool = False) -> str:
    """The q/k/v mode a setting means on this run: "auto" is FusionBench's separate q/k/v on its
    family (and in a preset that is FusionBench's merge), the originals' fused in_proj elsewhere."""
    if qkv != "auto":
        return qkv
    return "separate" if run.setup.family == "fusionbench" or fusionbench_preset else "fused"


def qkv_field(qkv: str) -> dict:
    """The report's field: named only for separate q/k/v, so that a fused run keeps the report,
    label and cache keys it had before the mode existed."""
    return {"qkv": qkv} if qkv == "separate" else {}


def qkv_suffix(qkv: str) -> str:
    return "_qkv_separate" if qkv == "separate" else ""


def attention_layout(run: Run, qkv: str = "fused") -> str:
    """How the attention input projection reaches a matrix method (Iso, WUDI, TSV-M, CART): one SVD
    / one objective of the fused 3d × d matrix in the originals (open_clip), three of the q, k, v
    blocks in FusionBench (its CLIPVisionModel's q_proj, k_proj, v_proj)."""
    if qkv == "separate":
        return ("attention q, k and v merged as three separate matrices (the q/k/v blocks of in_proj), "
                "as FusionBench merges its CLIPVisionModel's q_proj, k_proj, v_proj (qkv='separate')")
    if run.setup.family == "fusionbench":
        return ("attention in_proj merged as one fused matrix (q/k/v concatenated from the HF "
                "checkpoint at load time), as the open_clip originals; FusionBench merges q, k, v "
                "separately (qkv='separate')")
    return "attention in_proj merged as one fused matrix (open_clip's in_proj_weight), as the original"


def run_data_free(config: MergeRunConfig, script: str) -> dict:
    """Merge with the config's method, evaluate every task (task t with its own model where the
    method needs task identity), save the merge, and write the log and the JSON report."""
    recycle_freed_memory()
    name = config.method_key
    method = registry.method(name)
    run = Run(config, script, name)
    merge = method.merge(run, config)
    pretrained, _ = run.experts()
    check_merged(merge.name, merge.model, merge.per_task, merge.extra, pretrained, run.setup.tasks,
                 method.coefficient_keys)
    saved = run.save_merged(merge.model, merge.name, merge.extra)
    if merge.per_task:
        run.log.info("Evaluation uses task identity: task t is evaluated with its own reconstructed model.")
    accs = run.evaluate(merge.state_dicts(pretrained), per_task=merge.per_task)
    run.log.eval_step(0, accs)
    return run.finish(accs, merge=merge.name, merged_file=saved, task_identity=merge.per_task, **merge.extra)


def run_single_task_eval(config: SingleTaskEvalConfig, script: str) -> dict:
    """Zero-shot (θ0) and individual (θ_t on task t) accuracy: the reference rows of every table;
    with `model_file`, a saved model (one state dict: a merge or Traditional MTL) on every task too."""
    run = Run(config, script, "single_task", subfolder="single_task")
    split = config.split
    model = _saved_model(run, config.model_file) if config.model_file else None
    zeroshot = run.evaluate(run.setup.checkpoints.pretrained(), split)
    individual = run.individual if split == "test" else run.individual_val
    run.log.eval_step("zeroshot", zeroshot)
    run.log.eval_step("finetuned", individual)
    rows = {"Zero-shot": zeroshot, "Individual": individual}
    extra = {}
    if model is not None:
        name, state_dict = model
        accs = run.evaluate(state_dict, split)
        run.log.eval_step(name, accs)
        rows[name] = accs
        extra = {"model_file": os.path.abspath(config.model_file), "model_method": name,
                 "model_accuracy": accs, "average_model_accuracy": sum(accs.values()) / len(accs)}
    run.log.info(results_table(rows, run.setup.tasks))
    return run.log.write_report(method="single_task", model=run.setup.model_name,
                                checkpoint_family=run.setup.family,
                                preprocessing=run.setup.preprocessing, tasks=run.setup.tasks,
                                split=split, zeroshot_accuracy=zeroshot,
                                individual_accuracy=individual,
                                average_zeroshot=sum(zeroshot.values()) / len(zeroshot),
                                average_individual=sum(individual.values()) / len(individual), **extra)


def _saved_model(run: Run, path: str) -> tuple[str, Mapping[str, torch.Tensor]]:
    """(its method's name, a lazy reader) of a model a run saved; refused in one line when it is
    not one state dict of this run's encoder (a per-task method's compact file, another model)."""
    from taskmerge.models.encoders import check_encoder_state
    from taskmerge.runs.setup import encoder_for
    from taskmerge.storage.checkpoints import checkpoint_format, open_state_dict
    from taskmerge.storage.safe_pickle import CheckpointError
    if checkpoint_format(path) != "safetensors":
        raise CheckpointError(f"setting model_file={path!r}: not a .safetensors file; give a model saved "
                              f"by a merge's or Traditional MTL's save_dir")
    reader = open_state_dict(path)
    try:
        check_encoder_state(encoder_for(run.setup, run.setup.checkpoints.pretrained()), reader, path,
                            f"{run.setup.model_name}'s image encoder")
    except CheckpointError as e:
        raise CheckpointError(f"{e} (model_file takes one merged state dict, as Traditional MTL and the "
                              f"single-model merges save it; a per-task method's compact file is not one)"
                              ) from None
    name = getattr(reader, "metadata", {}).get("method") or os.path.splitext(os.path.basename(path))[0]
    run.log.info(f"model_file: {path} ({name})")
    return name, reader
