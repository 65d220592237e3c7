"""AdaMerging: learn the merging coefficients λ by entropy minimisation on unlabeled test images
(METHODS.md §2.4–2.7, A.2). Task-wise or layer-wise by the MergedEncoder's mode; the "++" variants
are the same loop with TIES-selected vectors as the source vectors (the caller picks them).

One step: for every task in order, two batches of 16 images drawn without replacement; loss =
Σ_tasks Σ_batches mean_over_batch H(softmax(head_t(θ(λ)(x)))) (a sum, not a mean); one Adam step.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from tqdm import tqdm

from taskmerge.adaptive.adaptation_data import TaskImages, sample_batches
from taskmerge.compute import distributed
from taskmerge.adaptive.functional_merge import MergedEncoder
from taskmerge.adaptive.training_state import TrainingCheckpoint


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """H(softmax(logits)) = −Σ_c p_c log p_c per row."""
    return -(logits.softmax(dim=1) * logits.log_softmax(dim=1)).sum(dim=1)


@dataclass
class AdaMergingConfig:
    steps: int = 500
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    batch_size: int = 16
    batches_per_task: int = 2
    eval_every: int = 500          # evaluate at init, when (step+1) % eval_every == 0, and at the end
    eval_batch_size: int = 128
    checkpoint_every: int = 50
    seed: int = 0


@dataclass
class AdaMergingResult:
    coefficients: torch.Tensor                  # rows × (1+T), published layout (clamped λ)
    history: list[dict] = field(default_factory=list)   # [{"step": "init"|k, "accs": {...}, "avg"}]
    losses: list[float] = field(default_factory=list)   # the summed entropy of every step

    @property
    def final_accs(self) -> dict[str, float]:
        return self.history[-1]["accs"]


def adamerging_step(merged: MergedEncoder, batches) -> float:
    """Accumulate d(Σ_b mean H_b)/dλ into λ_raw.grad for `batches` = iterable of (head, images).

    θ(λ) is merged once. Each batch runs forward and backward on its own, so its graph is freed
    at once (the originals keep all 16 alive until one backward); the batches' gradients add up in
    detached leaf copies of θ, and one backward through the merge carries their sum to λ. By the
    chain rule d(Σ_b L_b)/dλ = (Σ_b dL_b/dθ)·dθ/dλ, which is the originals' gradient.
    """
    theta = merged.merge(merged.forward_names)
    leaves = {k: v.detach().requires_grad_() for k, v in theta.items()}
    total = 0.0
    for head, images in batches:
        loss = entropy(head(merged.forward_with(leaves, images))).mean()
        loss.backward()
        total += loss.item()
    grads = [leaves[k].grad if leaves[k].grad is not None else torch.zeros_like(leaves[k]) for k in theta]
    torch.autograd.backward(list(theta.values()), grads)
    return total


@torch.no_grad()
def evaluate_merged(merged: MergedEncoder, tasks: Sequence[str], images: Mapping[str, TaskImages],
                    heads: Mapping[str, nn.Module], batch_size: int = 128,
                    device: str | torch.device = "cpu") -> dict[str, float]:
    """Accuracy of head_t(θ(λ)(x)) on each task's full test set (merge computed once)."""
    theta = merged.merge(merged.forward_names)
    accs = {}
    for t in tasks:
        correct = 0
        for x, y in tqdm(images[t].batches(batch_size, distributed.shard(len(images[t]))),
                         desc=f"eval {t}", leave=False):
            pred = heads[t](merged.forward_with(theta, x.to(device))).argmax(dim=1).cpu()
            correct += (pred == y).sum().item()
        correct, = distributed.sum_counts(correct)
        accs[t] = correct / len(images[t])
    return accs


def _log_eval(logger, history, step, accs):
    """Record one evaluation round; log it as `Eval: init:  …` or `Eval: Epoch: <k> …`."""
    history.append({"step": step, "accs": dict(accs), "avg": sum(accs.values()) / len(accs)})
    if logger is not None:
        if step == "init":
            logger.eval_step("", accs, prefix="Eval: init:")
        else:
            logger.eval_step(step, accs, prefix="Eval: Epoch:")


def train_adamerging(merged: MergedEncoder, tasks: Sequence[str], images: Mapping[str, TaskImages],
                     heads: Mapping[str, nn.Module], config: AdaMergingConfig = AdaMergingConfig(), *,
                     logger=None, checkpoint_dir: str | None = None, run_key: dict | None = None,
                     device: str | torch.device = "cpu",
                     on_step: Callable[[int], None] | None = None) -> AdaMergingResult:
    """Learn merged.lam_raw in place; returns the clamped table and the evaluation history.

    Log lines: `Eval: init:  dataset: <Name> ACC: …` and `Eval: Epoch: <k> dataset: …` (k 0-based).
    `run_key` must identify the inputs (model, checkpoints, method, ++ or not); with
    `checkpoint_dir` the run resumes from `<dir>/adamerging_<hash>.pt` if it exists.
    `on_step(k)` is called after step k (1-based) is done and checkpointed.
    """
    merged.to(device)
    for t in tasks:
        heads[t].to(device).requires_grad_(False)
    opt = torch.optim.Adam([merged.lam_raw], lr=config.lr, betas=config.betas, weight_decay=0.0)
    gen = torch.Generator().manual_seed(config.seed)
    key = {"config": {k: v for k, v in asdict(config).items() if k != "checkpoint_every"},
           "tasks": list(tasks), "mode": merged.mode, "clamp": merged.clamp, "run": run_key or {}}
    ckpt = TrainingCheckpoint(checkpoint_dir, "adamerging", key, config.checkpoint_every)
    history: list[dict] = []
    losses: list[float] = []
    start = 0
    state = ckpt.load(logger.info if logger is not None else None)
    if state is not None:
        with torch.no_grad():
            merged.lam_raw.copy_(state["lam_raw"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        start, losses = state["step"], state["losses"]
        if logger is not None:
            logger.info(f"Resumed AdaMerging from {ckpt.path} at step {start}")
        for h in state["history"]:
            _log_eval(logger, history, h["step"], h["accs"])
    else:
        accs = evaluate_merged(merged, tasks, images, heads, config.eval_batch_size, device)
        _log_eval(logger, history, "init", accs)

    distributed.barrier()  # every rank has read the resume state before rank 0 may replace it
    bar = tqdm(range(start, config.steps), desc=f"AdaMerging ({merged.mode}-wise)", initial=start,
               total=config.steps)
    rank, world = distributed.rank(), distributed.world_size()
    for step in bar:
        # every rank draws every batch (one generator state everywhere) and runs its own share
        drawn = [(t, idx) for t in tasks
                 for idx in sample_batches(len(images[t]), gen, config.batch_size, config.batches_per_task)]
        batches = ((heads[t], images[t].take(idx).to(device)) for i, (t, idx) in enumerate(drawn)
                   if i % world == rank)
        opt.zero_grad(set_to_none=True)
        loss = adamerging_step(merged, batches)
        if world > 1:  # the same sum of 2·T batch gradients as one process, up to float rounding
            distributed.all_reduce_sum(merged.lam_raw.grad)
            loss = float(distributed.all_reduce_sum(torch.tensor([loss], dtype=torch.float64)))
        losses.append(loss)
        opt.step()
        bar.set_postfix(entropy=f"{losses[-1]:.4f}")
        if (step + 1) % config.eval_every == 0 or step + 1 == config.steps:
            accs = evaluate_merged(merged, tasks, images, heads, config.eval_batch_size, device)
            _log_eval(logger, history, step, accs)
        ckpt.maybe_save(step + 1, lambda: {
            "lam_raw": merged.lam_raw.detach().cpu(), "optimizer": opt.state_dict(),
            "generator": gen.get_state(), "history": history, "losses": losses},
            final=step + 1 == config.steps)
        if on_step is not None:
            on_step(step + 1)

    rows = merged.coefficient_rows()
    if logger is not None:
        logger.info("Coefficients [1.0, λ_1..λ_T] per row: "
                    + str([[round(v, 4) for v in r] for r in rows.tolist()]))
    return AdaMergingResult(rows, history, losses)
