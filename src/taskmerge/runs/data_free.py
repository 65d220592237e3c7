"""The data-free methods wired to checkpoints, data and logs.

`MERGERS[name](run, settings)` builds one method's merge from a run's experts (its settings are
the typed `*Merge` of runs/script_configs.py), choosing a coefficient on the `<Task>Val` splits
where the method's family does; `run_data_free(config, script)` is what an entry script calls:
merge, evaluate every task, log and report. Surgery uses the same mergers for its base models
(runs/adaptive.py). The merge math itself lives in `merging/`.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping

import torch

from taskmerge import merging
from taskmerge.merging.tall_masks import load_released_masks
from taskmerge.merging.task_vectors import apply, merged_keys, numel_of
from taskmerge.compute import cpu_paths, distributed
from taskmerge.compute.devices import default_num_workers, default_threads, resolve_device, use_tf32
from taskmerge.runs.evaluation import LoaderSettings, evaluate
from taskmerge.runs.identity import checkpoint_digests, merge_settings, short_hash
from taskmerge.runs.reporting import RunLogger, results_table
from taskmerge.merging.iso import EARLY_STOPPING_PATIENCE
from taskmerge.runs.script_configs import (VAL_GRIDS, CARTMerge, DareSettings, EMRMerge, IsoMerge,
                                           MergeRunConfig, PCBMerge, RunConfig, SingleTaskEvalConfig,
                                           TallMasksMerge, TaskArithmeticMerge, TiesMerge, TSVMerge,
                                           WeightAveragingMerge, WUDIMerge)
from taskmerge.runs.heads import load_heads
from taskmerge.runs.selection import search_coefficients, select_coefficient, select_per_task
from taskmerge.runs.setup import (Setup, encoder_for, evaluate_tasks, evaluation_split, finish_run,
                                  individual_accuracies, released_masks_path, resolve_cache_dir, resolve_setup,
                                  start_run, validate_checkpoints)
from taskmerge.runs import validation
from taskmerge.runs.validation import check_merged
from taskmerge.storage.allocator import recycle_freed_memory
from taskmerge.storage.errors import ConfigError
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
                      "settings": merge_settings(extra or {})}
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


def _coef(run: Run, coef: float, select_on_val: bool, val_grid: str, delta):
    """`coef`, or the coefficient chosen on validation over `val_grid` when `select_on_val`."""
    if not select_on_val:
        return coef, None
    pretrained, _ = run.experts()
    return run.select(VAL_GRIDS[val_grid], lambda c: apply(pretrained, delta, c))


def merge_weight_averaging(run: Run, s: WeightAveragingMerge) -> Merge:
    pretrained, experts = run.experts()
    drop_last = s.drop_last
    merged = merging.weight_averaging(pretrained, experts, drop_last=drop_last, validate_inputs=False)
    return Merge("weight_averaging" + ("_drop_last" if drop_last else ""), merged,
                 extra={"drop_last": drop_last})


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


def merge_task_arithmetic(run: Run, s: TaskArithmeticMerge) -> Merge:
    pretrained, experts, prefix, dare = dare_experts(run, s)
    tau_sum = merging.multitask_vector(pretrained, experts, validate_inputs=False)
    lam, curve = _coef(run, s.scaling_coef, s.select_on_val, s.val_grid, tau_sum)
    run.log.info(f"scaling_coef:{lam}")
    return Merge(f"{prefix}task_arithmetic_{lam}", apply(pretrained, tau_sum, lam),
                 extra={**dare, "scaling_coef": lam, "val_curve": curve})


def ties_settings(s: TiesMerge) -> dict:
    """The preset's k / merge / λ, each replaced by the setting that is not None."""
    settings = dict(merging.TIES_PRESETS[s.preset])
    for value, name in ((s.k, "k"), (s.merge, "merge"), (s.scaling_coef, "lam")):
        if value is not None:
            settings[name] = value
    return settings


def merge_ties(run: Run, settings: TiesMerge) -> Merge:
    s = ties_settings(settings)
    run.log.info(f"TIES settings: {s}")
    pretrained, experts, prefix, dare = dare_experts(run, settings)
    keys, key_set = flattened_keys(run)
    delta = merging.ties_delta(pretrained, experts, k=s["k"], merge=s["merge"], validate_inputs=False,
                               keys=keys)
    lam, curve = _coef(run, s["lam"], s["lam"] is None, settings.val_grid, delta)
    suffix = "_vision" if keys is not None else ""
    return Merge(f"{prefix}ties_{s['merge']}_k{s['k']}_{lam}{suffix}", apply(pretrained, delta, lam),
                 extra={**dare, "ties": s, **key_set, "scaling_coef": lam, "val_curve": curve})


def merge_emr(run: Run, s: EMRMerge) -> Merge:
    pretrained, experts = run.experts()
    rescaler, qkv = s.rescaler, qkv_mode(run, s.qkv)
    if rescaler == "code":
        run.log.info(f"EMR rescaler: per-tensor means over {_tensors(qkv)}")
    emr = merging.emr_merging(pretrained, experts, rescaler=rescaler, validate_inputs=False, qkv=qkv)
    run.log.info(f"Rescalers ({rescaler}): "
                 + ", ".join(f"{t}: {float(r):.4f}" for t, r in zip(emr.tasks, emr.rescalers)))
    return Merge(f"emr_{rescaler}{_qkv_suffix(qkv)}", emr, per_task=True,
                 extra={"rescaler": rescaler, **qkv_field(qkv),
                        "rescalers": dict(zip(emr.tasks, emr.rescalers.tolist())),
                        "storage": emr.storage_report()})


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
    alpha, curve = _coef(run, s.alpha, s.select_on_val, s.val_grid, delta)
    return Merge(f"{method}_{alpha}{_qkv_suffix(qkv)}", apply(pretrained, delta, alpha),
                 extra={"tsv_method": method, **qkv_field(qkv), "alpha": alpha, "val_curve": curve})


def merge_tall_masks(run: Run, s: TallMasksMerge) -> Merge:
    method, use_ties, k = s.method, s.use_ties, s.prun_thre_k
    tasks, lams = run.setup.tasks, list(s.tall_lambdas)
    if method == "consensus" and k > len(tasks):
        raise ConfigError(f"setting prun_thre_k={k} is not allowed with {len(tasks)} tasks: consensus "
                          f"keeps the weights that at least k tasks select (1 <= k <= {len(tasks)})")
    pretrained, experts = run.experts()
    keys, key_set = flattened_keys(run) if use_ties else (None, {})
    tau_mtl = merging.multitask_vector(pretrained, experts, use_ties, validate_inputs=False, keys=keys)
    suffix = "_use_ties" if use_ties else ""
    if s.load_mask:  # the released masks instead of choosing λ per task (tall_masks' load_mask=True)
        path = released_masks_path(run.setup, use_ties)
        run.log.info(f"Loading the released TALL masks from {path}")
        tall = load_released_masks(path, pretrained, tau_mtl, tasks, use_ties)
        extra = {"masks_loaded_from": path, "use_ties": use_ties, "storage": tall.storage_report()}
    else:
        tall, extra = _choose_tall_masks(run, lams, pretrained, experts, tau_mtl, use_ties)
    extra.update(key_set)
    if method == "tall_mask":
        return Merge(f"TALL_mask_{len(tasks)}task{suffix}", tall, per_task=True, extra=extra)
    mask = merging.consensus_mask(tall, k)
    delta = {key: tau * mask[key] for key, tau in tall.tau_mtl.items()}
    kept = sum(int(m.sum()) for m in mask.values()) / max(sum(m.numel() for m in mask.values()), 1)
    run.log.info(f"Consensus k={k}: keeps {100 * kept:.2f}% of the multi-task vector's entries")
    alpha, curve = _coef(run, s.alpha, s.select_on_val, s.val_grid, delta)
    return Merge(f"consensus_k{k}_{alpha}{suffix}", apply(pretrained, delta, alpha),
                 extra={**extra, "alpha": alpha, "prun_thre_k": k, "kept_fraction": kept,
                        "val_curve": curve})


def _choose_tall_masks(run: Run, lams: list[float], pretrained, experts, tau_mtl, use_ties: bool):
    """Each task's mask at the λ its <Task>Val accuracy chooses (the originals' default path)."""
    tasks = run.setup.tasks

    def task_model(task, lam):
        mask = merging.tall_mask(pretrained, experts[task], tau_mtl, lam)
        return apply(pretrained, {k: v * mask[k] for k, v in tau_mtl.items()}, 1.0)

    def task_val_acc(task, sd):
        data, loader = evaluation_split(run.setup, task, "val")
        return evaluate(encoder_for(run.setup, sd), run.heads[task], data, run.batch_size,
                        device=run.setup.device, loader=loader)

    run.log.info(f"Choosing each task's TALL λ on its <Task>Val split over {lams}")
    chosen, lam_curve = select_per_task(lams, tasks, task_model, task_val_acc, run.log.info)
    tall = merging.tall_masks(pretrained, experts, [chosen[t] for t in tasks], tau_mtl=tau_mtl,
                              use_ties=use_ties, validate_inputs=False)
    return tall, {"tall_lambdas": chosen, "tall_val_curve": lam_curve, "use_ties": use_ties,
                  "storage": tall.storage_report()}


def _tensors(qkv: str) -> str:
    return ("q, k and v as three tensors (FusionBench's CLIPVisionModel)" if qkv == "separate"
            else "the fused in_proj as one tensor (open_clip's, the original's)")


def _qkv_suffix(qkv: str) -> str:
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
    return Merge(f"{method}_{alpha}{_qkv_suffix(qkv)}", apply(pretrained, delta, alpha),
                 extra={"iso_method": method, **fraction, **qkv_field(qkv), "alpha": alpha,
                        "val_curve": curve})


def wudi_settings(s: WUDIMerge) -> dict:
    """The preset's solver settings with the script's; Adam's steps and lr only where Adam runs."""
    settings = {**merging.WUDI_PRESETS[s.wudi_preset], "solver": s.wudi_solver, "lr": s.wudi_lr}
    if s.wudi_steps is not None:
        settings["steps"] = s.wudi_steps
    if s.wudi_solver == "closed_form":
        del settings["steps"], settings["lr"]
        settings["ridge"] = s.wudi_ridge
    return {"preset": s.wudi_preset, **settings}


def merge_wudi(run: Run, s: WUDIMerge) -> Merge:
    w = wudi_settings(s)
    qkv = qkv_mode(run, s.qkv, fusionbench_preset=s.wudi_preset == "fusionbench")
    run.log.info(f"WUDI settings: {w}")
    run.log.info(attention_layout(run, qkv))
    pretrained, experts = run.experts()
    merged = merging.wudi_merging(pretrained, experts, solver=w["solver"], steps=w.get("steps", 0),
                                  lr=w.get("lr", 1.0), keys=w["keys"], others=w["others"],
                                  ridge=w.get("ridge", 0.0), validate_inputs=False, qkv=qkv)
    steps = f"_{w['steps']}" if "steps" in w else ""
    return Merge(f"wudi_{w['preset']}_{w['solver']}{steps}{_qkv_suffix(qkv)}", merged,
                 extra={"wudi": w, **qkv_field(qkv)})


def cart_settings(s: CARTMerge, num_tasks: int) -> tuple[str, dict]:
    """(where the preset came from, {preset, lam, rank_ratio}): the repository's config for
    `cart_preset` tasks (None: the one nearest the run's number of tasks), each value replaced by the
    setting that is not None."""
    presets = merging.CART_PRESETS
    size = s.cart_preset
    why = f"cart_preset={size}"
    if size is None:
        size = min(presets, key=lambda n: (abs(n - num_tasks), n))
        why = f"the repository's config nearest to {num_tasks} tasks" if size != num_tasks else               f"the repository's {num_tasks}-task config"
    settings = {"preset": size, **presets[size]}
    if s.cart_lambda is not None:
        settings["lam"] = s.cart_lambda
    if s.cart_rank_ratio is not None:
        settings["rank_ratio"] = s.cart_rank_ratio
    return why, settings


def merge_cart(run: Run, s: CARTMerge) -> Merge:
    why, c = cart_settings(s, len(run.setup.tasks))
    run.log.info(f"CART settings: {c} ({why})")
    run.log.info(attention_layout(run))
    pretrained, experts = run.experts()
    merged = merging.cart_merging(pretrained, experts, c["lam"], c["rank_ratio"], validate_inputs=False)
    return Merge(f"cart_{c['lam']}_rho{c['rank_ratio']}", merged, extra={"cart": c})


def merge_pcb(run: Run, s: PCBMerge) -> Merge:
    """pcb_ES.py's balancing with pcb.py's fixed λ (neither original runs this pair), or with
    pcb_ES.py's own search of one λ_t per task on <Task>Val (`pcb_search`)."""
    pretrained, experts = run.experts()
    keys, key_set = flattened_keys(run)
    suffix = "_vision" if keys is not None else ""
    if not s.pcb_search:
        p = {"ratio": s.pcb_ratio, "lam": s.pcb_lambda}
        run.log.info(f"PCB settings: {p} (pcb_ES.py's balancing, pcb.py's fixed λ_t = {s.pcb_lambda} "
                     f"for every task)")
        merged = merging.pcb_merging(pretrained, experts, s.pcb_ratio, s.pcb_lambda, validate_inputs=False,
                                     keys=keys)
        return Merge(f"pcb_r{s.pcb_ratio}_{s.pcb_lambda}{suffix}", merged, extra={"pcb": p, **key_set})
    search = {"lower": s.pcb_search_lower, "upper": s.pcb_search_upper, "init": s.pcb_search_init,
              "budget": s.pcb_search_budget, "seed": s.pcb_search_seed,
              "optimiser": "(1+1)-ES, one-fifth rule"}
    run.log.info(f"PCB settings: ratio {s.pcb_ratio}; pcb_ES.py's balancing and its λ_t search on the "
                 f"<Task>Val splits (mean absolute ACC), {search}")
    scores = merging.pcb_scores(pretrained, experts, s.pcb_ratio, validate_inputs=False, keys=keys)
    tasks = run.setup.tasks

    def merged_at(lams):
        return apply(pretrained, merging.pcb_combine(pretrained, experts, scores, lams), consume=True)

    lams, curve = search_coefficients(lambda lams: run.evaluate(merged_at(lams), "val"),
                                      [s.pcb_search_init] * len(tasks), s.pcb_search_lower,
                                      s.pcb_search_upper, s.pcb_search_budget, s.pcb_search_seed,
                                      run.log.info)
    chosen = dict(zip(tasks, lams))
    run.log.info(f"Chosen λ_t: {chosen}")
    p = {"ratio": s.pcb_ratio, "search": search, "lams": chosen}
    return Merge(f"pcb_r{s.pcb_ratio}_search{s.pcb_search_budget}_seed{s.pcb_search_seed}{suffix}",
                 merged_at(lams), extra={"pcb": p, **key_set, "val_curve": curve})


MERGERS: dict[str, Callable[[Run, object], Merge]] = {
    "weight_averaging": merge_weight_averaging,
    "task_arithmetic": merge_task_arithmetic,
    "ties_merging": merge_ties,
    "emr_merging": merge_emr,
    "tsv_merging": merge_tsv,
    "tall_masks": merge_tall_masks,
    "iso_merging": merge_iso,
    "wudi_merging": merge_wudi,
    "cart_merging": merge_cart,
    "pcb_merging": merge_pcb,
}


def run_data_free(config: MergeRunConfig, script: str) -> dict:
    """Merge with the config's method, evaluate every task (task t with its own model where the
    method needs task identity), save the merge, and write the log and the JSON report."""
    recycle_freed_memory()
    name = config.method_key
    run = Run(config, script, name)
    merge = MERGERS[name](run, config)
    pretrained, _ = run.experts()
    check_merged(merge.name, merge.model, merge.per_task, merge.extra, pretrained, run.setup.tasks)
    saved = run.save_merged(merge.model, merge.name, merge.extra)
    if merge.per_task:
        run.log.info("Evaluation uses task identity: task t is evaluated with its own reconstructed model.")
    accs = run.evaluate(merge.state_dicts(pretrained), per_task=merge.per_task)
    run.log.eval_step(0, accs)
    return run.finish(accs, merge=merge.name, merged_file=saved, task_identity=merge.per_task, **merge.extra)


def run_single_task_eval(config: SingleTaskEvalConfig, script: str) -> dict:
    """Zero-shot (θ0) and individual (θ_t on task t) accuracy: the reference rows of every table."""
    run = Run(config, script, "single_task", subfolder="single_task")
    split = config.split
    zeroshot = run.evaluate(run.setup.checkpoints.pretrained(), split)
    individual = run.individual if split == "test" else run.individual_val
    run.log.eval_step("zeroshot", zeroshot)
    run.log.eval_step("finetuned", individual)
    run.log.info(results_table({"Zero-shot": zeroshot, "Individual": individual}, run.setup.tasks))
    return run.log.write_report(method="single_task", model=run.setup.model_name,
                                checkpoint_family=run.setup.family,
                                preprocessing=run.setup.preprocessing, tasks=run.setup.tasks,
                                split=split, zeroshot_accuracy=zeroshot,
                                individual_accuracy=individual,
                                average_zeroshot=sum(zeroshot.values()) / len(zeroshot),
                                average_individual=sum(individual.values()) / len(individual))
