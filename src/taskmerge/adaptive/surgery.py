"""Representation Surgery v1 and its online variant (METHODS.md §2.8, A.3); the training loop that
SurgeryV2 (`surgery_v2.py`) shares.

The base merged encoder is fixed (any method: WA, TA, TIES, AdaMerging(++), EMR, TSV-M,
Consensus; per-task bases such as EMR's are fine), and so are the experts. v1 therefore trains on
features computed once: the base's and the expert's final features on each task's test images
(`feature_cache.encoder_features` / `expert_features`). SurgeryV2's modules change the tokens
that later blocks see, so the fixed merged encoder runs every step; the experts' per-block token
means and final features are still computed once.

Schedule (both): per iteration, for each task in order, 2 batches of 16 drawn without replacement;
per batch zero_grad → L1 (mean) → backward → Adam step (16 steps per iteration with 8 tasks), one
Adam over all tasks' modules; evaluation of head_t(module_t(·)) on every task every 100 iterations.

`zero_grad_mode` (§2.8): the published numbers were produced with torch 1.8–1.10, whose
`zero_grad()` zeroes gradients in place ("zero"): once a task's module has been used its .grad is a
zero tensor, and Adam keeps moving it with its momentum while other tasks train. torch ≥ 2.0 sets
them to None ("none"), and Adam skips modules whose task is not being trained. Default: "zero",
the environment of the published results. The mode is written to the log.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from taskmerge.adaptive.adaptation_data import sample_batches
from taskmerge.adaptive.surgery_modules import make_adapters
from taskmerge.adaptive.training_state import TrainingCheckpoint, grad_presence, restore_grad_presence
from taskmerge.compute import distributed

ZERO_GRAD_MODES = {
    "zero": "torch 1.x zero_grad(set_to_none=False): modules used before keep moving with Adam momentum",
    "none": "torch 2.x zero_grad(set_to_none=True): only the current task's module is updated",
}
ONLINE_RATIOS = (0.01, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)


@dataclass
class SurgeryConfig:
    rank: int = 16                 # SurgeryV2 paper's v1 baseline: 304 (B) / 132 (L/14)
    iterations: int = 500
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    batch_size: int = 16
    batches_per_task: int = 2
    eval_every: int = 100
    eval_batch_size: int = 128     # SurgeryV2 full-test-set evaluation passes
    checkpoint_every: int = 100    # iterations (online: samples)
    zero_grad_mode: str = "zero"
    seed: int = 0

    def __post_init__(self):
        if self.zero_grad_mode not in ZERO_GRAD_MODES:
            raise ValueError(f"zero_grad_mode must be one of {list(ZERO_GRAD_MODES)}, got {self.zero_grad_mode!r}")


@dataclass
class SurgeryResult:
    adapters: nn.ModuleDict
    history: list[dict] = field(default_factory=list)    # evaluation rounds (see each trainer)
    losses: list[float] = field(default_factory=list)    # mean training L1 per iteration / sample
    # after-surgery features per task: v1 {"final": ẑ} (+ the unchanged "blocks" if given), v2 both
    corrected: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def final_accs(self) -> dict[str, float]:
        if self.history and "accs" in self.history[-1]:
            return self.history[-1]["accs"]
        return {h["task"]: h["acc"] for h in self.history if h["ratio"] == 1.0}  # online


@torch.no_grad()
def accuracy(features: torch.Tensor, labels: torch.Tensor, head: nn.Module) -> float:
    """correct / N as a Python float, like the originals' evaluation loop."""
    pred = head(features.to(next(head.parameters()).device)).argmax(dim=1).cpu()
    return (pred == labels.cpu()).sum().item() / len(labels)


def adam_step(opt: torch.optim.Optimizer, loss: torch.Tensor, zero_grad_mode: str) -> None:
    opt.zero_grad(set_to_none=zero_grad_mode == "none")
    loss.backward()
    opt.step()


@torch.no_grad()
def corrected_features(adapters: nn.ModuleDict, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """v1: ẑ = module_t(z) for each task's final features."""
    return {t: adapters[t](z.to(next(adapters[t].parameters()).device)).cpu() for t, z in features.items()}


def final_features(features) -> torch.Tensor:
    """A task's final features, given as a tensor or as a feature dict {"final", "blocks"}."""
    return features["final"] if isinstance(features, Mapping) else features


def _record(history, logger, entry: dict) -> None:
    history.append(entry)
    if logger is not None:
        logger.eval_step(entry["label"], entry["accs"], prefix=entry["prefix"])


def eval_round(step, accs, prefix="Eval: step:", label=None) -> dict:
    return {"step": step, "accs": dict(accs), "avg": sum(accs.values()) / len(accs),
            "prefix": prefix, "label": step if label is None else label}


def train_loop(kind: str, tasks: Sequence[str], sizes: Mapping[str, int], adapters: nn.ModuleDict,
               gen: torch.Generator, batch_loss: Callable, evaluate: Callable, init_round: dict,
               config: SurgeryConfig, logger, checkpoint_dir, run_key, on_step) -> tuple[list, list]:
    """The iteration loop shared by v1 and v2, with checkpoint/resume: `batch_loss(task, indices)`
    is one step's loss, `evaluate()` returns {task: accuracy}, `init_round` is the step-0 round."""
    params = list(adapters.parameters())
    opt = torch.optim.Adam(params, lr=config.lr, betas=config.betas, weight_decay=0.0)
    key = {"config": {k: v for k, v in asdict(config).items() if k != "checkpoint_every"},
           "tasks": list(tasks), "sizes": dict(sizes), "run": run_key or {}}
    ckpt = TrainingCheckpoint(checkpoint_dir, kind, key, config.checkpoint_every)
    if logger is not None:
        logger.info(f"{kind}: rank {config.rank}, trainable parameters {sum(p.numel() for p in params)}, "
                    f"zero_grad_mode={config.zero_grad_mode} ({ZERO_GRAD_MODES[config.zero_grad_mode]})")
    history, losses, start = [], [], 0
    state = ckpt.load(logger.info if logger is not None else None)
    if state is not None:
        adapters.load_state_dict(state["adapters"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        restore_grad_presence(params, state["grad_present"])
        start, losses = state["step"], state["losses"]
        if logger is not None:
            logger.info(f"Resumed {kind} from {ckpt.path} at iteration {start}")
        for entry in state["history"]:
            _record(history, logger, entry)
    else:
        _record(history, logger, init_round)
    distributed.barrier()  # every rank has read the resume state before rank 0 may replace it
    bar = tqdm(range(start, config.iterations), desc=kind, initial=start, total=config.iterations)
    for it in bar:
        total, count = 0.0, 0
        for t in tasks:
            for idx in sample_batches(sizes[t], gen, config.batch_size, config.batches_per_task):
                loss = batch_loss(t, idx)
                adam_step(opt, loss, config.zero_grad_mode)
                total, count = total + loss.item(), count + 1
        losses.append(total / count)
        bar.set_postfix(l1=f"{losses[-1]:.4f}")
        if (it + 1) % config.eval_every == 0 or it + 1 == config.iterations:
            distributed.broadcast_module(adapters)  # ranks step alike; evaluate rank 0's modules exactly
            _record(history, logger, eval_round(it + 1, evaluate()))
        ckpt.maybe_save(it + 1, lambda: {
            "adapters": adapters.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
            "grad_present": grad_presence(params), "history": history, "losses": losses},
            final=it + 1 == config.iterations)
        if on_step is not None:
            on_step(it + 1)
    return history, losses


def train_surgery(tasks: Sequence[str], base_features: Mapping[str, torch.Tensor],
                  target_features: Mapping[str, torch.Tensor], labels: Mapping[str, torch.Tensor],
                  heads: Mapping[str, nn.Module], config: SurgeryConfig = SurgeryConfig(), *,
                  logger=None, checkpoint_dir: str | None = None, run_key: dict | None = None,
                  device: str | torch.device = "cpu",
                  on_step: Callable[[int], None] | None = None) -> SurgeryResult:
    """Surgery v1 on cached final features: base_features[t] = z of the merged encoder on task t's
    test images (N, d), target_features[t] = the expert's z on the same images, in the same order
    (tensors, or the feature dicts of `feature_cache`). Logs `Eval: step: 0 …` (the base method)
    and `Eval: step: <k> …` every eval_every iterations."""
    z = {t: final_features(base_features[t]).float().to(device) for t in tasks}
    z_ft = {t: final_features(target_features[t]).float().to(device) for t in tasks}
    for t in tasks:
        if z[t].shape != z_ft[t].shape:
            raise ValueError(f"{t}: base features {tuple(z[t].shape)} vs expert features {tuple(z_ft[t].shape)}")
        heads[t].to(device).requires_grad_(False)
    gen = torch.Generator().manual_seed(config.seed)
    adapters = make_adapters(tasks, z[tasks[0]].shape[1], config.rank, gen).to(device)

    def batch_loss(t, idx):
        idx = idx.to(device)
        return F.l1_loss(adapters[t](z[t][idx]), z_ft[t][idx])

    @torch.no_grad()
    def evaluate():
        return {t: accuracy(adapters[t](z[t]), labels[t], heads[t]) for t in tasks}

    history, losses = train_loop("surgery_v1", tasks, {t: len(z[t]) for t in tasks}, adapters, gen, batch_loss,
                                 evaluate, eval_round(0, evaluate()), config, logger, checkpoint_dir, run_key,
                                 on_step)
    corrected = {t: {"final": zc} for t, zc in corrected_features(adapters, z).items()}
    for t in tasks:   # v1 leaves the blocks alone: the report's per-block distances are unchanged
        if isinstance(base_features[t], Mapping) and "blocks" in base_features[t]:
            corrected[t]["blocks"] = base_features[t]["blocks"]
    return SurgeryResult(adapters, history, losses, corrected)


def online_eval_points(n: int, ratios: Sequence[float] = ONLINE_RATIOS) -> list[tuple[float, int]]:
    """(ratio, sample count int(r·N)) at which the online variant evaluates the current task."""
    return [(r, int(r * n)) for r in ratios]


def train_surgery_online(tasks: Sequence[str], base_features: Mapping[str, torch.Tensor],
                         target_features: Mapping[str, torch.Tensor], labels: Mapping[str, torch.Tensor],
                         heads: Mapping[str, nn.Module], config: SurgeryConfig = SurgeryConfig(), *,
                         ratios: Sequence[float] = ONLINE_RATIOS, logger=None,
                         checkpoint_dir: str | None = None, run_key: dict | None = None,
                         device: str | torch.device = "cpu",
                         on_step: Callable[[int], None] | None = None) -> SurgeryResult:
    """Online v1: tasks in order, one shuffled pass per task with batch 1, one Adam step per sample
    (shared optimizer); the current task is evaluated after int(r·N) samples (count 0 = before any
    step, when r·N < 1), logged as `Eval: ratio: <r> step:<count> dataset: <Name> ACC: <acc>`.
    history: [{"task", "ratio", "step", "acc"}]; checkpoint_every counts samples."""
    z = {t: final_features(base_features[t]).float().to(device) for t in tasks}
    z_ft = {t: final_features(target_features[t]).float().to(device) for t in tasks}
    for t in tasks:
        heads[t].to(device).requires_grad_(False)
    gen = torch.Generator().manual_seed(config.seed)
    adapters = make_adapters(tasks, z[tasks[0]].shape[1], config.rank, gen).to(device)
    params = list(adapters.parameters())
    opt = torch.optim.Adam(params, lr=config.lr, betas=config.betas, weight_decay=0.0)
    key = {"config": {k: v for k, v in asdict(config).items() if k != "checkpoint_every"}, "ratios": list(ratios),
           "tasks": list(tasks), "sizes": {t: len(z[t]) for t in tasks}, "run": run_key or {}}
    ckpt = TrainingCheckpoint(checkpoint_dir, "surgery_online", key, config.checkpoint_every)
    log = logger.info if logger is not None else (lambda line="": None)
    log(f"surgery_online: rank {config.rank}, trainable parameters {sum(p.numel() for p in params)}, "
        f"zero_grad_mode={config.zero_grad_mode} ({ZERO_GRAD_MODES[config.zero_grad_mode]})")
    history, losses, seen, task0, pos, perm = [], [], 0, 0, None, None
    state = ckpt.load(log)
    if state is not None:
        adapters.load_state_dict(state["adapters"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        restore_grad_presence(params, state["grad_present"])
        seen, task0, pos, perm = state["step"], state["task_index"], state["pos"], state["perm"]
        history, losses = state["history"], state["losses"]
        log(f"Resumed surgery_online from {ckpt.path} at sample {seen}")
        for h in history:
            log(f"Eval: ratio: {h['ratio']} step:{h['step']} dataset: {h['task']} ACC: {h['acc']}")
    distributed.barrier()  # every rank has read the resume state before rank 0 may replace it

    def evaluate_at(t, count, points):
        for r, k in points:
            if k == count:
                with torch.no_grad():
                    acc = accuracy(adapters[t](z[t]), labels[t], heads[t])
                history.append({"task": t, "ratio": r, "step": count, "acc": acc})
                log(f"Eval: ratio: {r} step:{count} dataset: {t} ACC: {acc}")

    for ti in range(task0, len(tasks)):
        t, n = tasks[ti], len(z[tasks[ti]])
        points = online_eval_points(n, ratios)
        if not (state is not None and ti == task0):
            perm, pos = torch.randperm(n, generator=gen), 0
            log(f"{t} Eval step:")
            log(str([k for _, k in points]))
            evaluate_at(t, 0, points)
        for count in tqdm(range(pos + 1, n + 1), desc=f"online {t}", initial=pos, total=n):
            i = perm[count - 1:count].to(device)
            loss = F.l1_loss(adapters[t](z[t][i]), z_ft[t][i])
            adam_step(opt, loss, config.zero_grad_mode)
            losses.append(loss.item())
            evaluate_at(t, count, points)
            seen += 1
            ckpt.maybe_save(seen, lambda: {
                "adapters": adapters.state_dict(), "optimizer": opt.state_dict(), "generator": gen.get_state(),
                "grad_present": grad_presence(params), "task_index": ti, "pos": count, "perm": perm,
                "history": history, "losses": losses},
                final=ti == len(tasks) - 1 and count == n)
            if on_step is not None:
                on_step(seen)
    return SurgeryResult(adapters, history, losses)
