"""Traditional MTL: one image encoder fine-tuned jointly on every task's training split, each
example's cross-entropy taken through its own task's frozen zero-shot head (METHODS.md §6.1's
reference row).

The loop is FusionBench's multi-task `clip_finetune`
(fusion_bench/method/classification/clip_finetune.py, tanganke/fusion_bench 54c9e8c9): every step
takes one batch of `batch_size` from every task (L163-166, a shuffled loader per task, L138-152)
and backpropagates the *sum* of the tasks' mean cross-entropies (L162, L170, one backward L173);
one optimizer step and one scheduler step follow (L175-176). Its recipe (`FUSIONBENCH`):
torch.optim.Adam over the vision model's parameters only (L261-269; its `visual_projection` sits
outside `vision_model`, so it stays frozen: here `visual.proj`), weight decay as Adam's L2 term,
CosineAnnealingLR with T_max = steps (L270-272; no warm-up, evaluated in closed form here), no
gradient clipping, no augmentation (CLIPProcessor only), and
config/method/classification/clip_finetune.yaml's lr 1e-5, 4000 steps, batch 128, weight decay 0.
The other recipe a run may ask for is the experts' own (task_vectors': AdamW, warm-up then cosine,
clipping, random-resized crops; embedded/finetuning.py), applied to the mixture.

Here the sum's gradient is accumulated task by task (one task's graph alive at a time, as memory
must stay flat in the number of tasks); d(Σ_t L_t)/dθ = Σ_t dL_t/dθ, so the step is FusionBench's.
Under torchrun the encoder is wrapped in DistributedDataParallel: every rank draws the same batches
and crops and runs its `distributed.shard` of each task's batch; its loss is scaled so that DDP's
averaged gradient is one process's gradient, up to rounding. Batches are a pure function of (seed,
task, step), so a DataLoader may prefetch them (a split too big to preload) and a resumed run
draws the same ones; the crops come from one generator saved with the model, the optimizer and
the loss history (adaptive/training_state.py): a killed run resumes bit-identically.
"""
from __future__ import annotations

import contextlib
import hashlib
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

from taskmerge.adaptive.adaptation_data import TaskImages
from taskmerge.adaptive.fine_tuning import apply_crops, cosine_lr, crop_boxes
from taskmerge.adaptive.training_state import TrainingCheckpoint
from taskmerge.compute import distributed

OPTIMIZERS = ("adam", "adamw")


@dataclass(frozen=True)
class MultiTaskRecipe:
    """How the joint fine-tuning runs (every field enters the trained encoder's cache key)."""
    steps: int
    batch_size: int                  # per task, per step (FusionBench's `batch_size`)
    lr: float
    weight_decay: float
    optimizer: str                   # "adam": torch.optim.Adam, decay as L2 (FusionBench); "adamw"
    warmup: int                      # linear warm-up steps before the cosine (0: CosineAnnealingLR)
    grad_clip: float | None          # gradient-norm clipping; None: none (FusionBench)
    crop_scale: tuple[float, float] | None   # random-resized-crop scale; None: no augmentation
    train_projection: bool           # the output projection trains too (task_vectors' experts)


# clip_finetune.yaml L8-11 and clip_finetune.py L261-272 (its seed, 42 in L7, is the run's `seed`)
FUSIONBENCH = MultiTaskRecipe(steps=4000, batch_size=128, lr=1e-5, weight_decay=0.0, optimizer="adam",
                              warmup=0, grad_clip=None, crop_scale=None, train_projection=False)


def experts_recipe(finetune: Mapping) -> MultiTaskRecipe:
    """The recipe the experts were fine-tuned with (an embedded build's manifest "recipe" →
    "finetune", embedded/build.py RECIPE), applied to the mixture: `batch_size` images per task."""
    crop = finetune.get("crop_scale")
    return MultiTaskRecipe(steps=int(finetune["steps"]), batch_size=int(finetune["batch_size"]),
                           lr=float(finetune["lr"]), weight_decay=float(finetune["weight_decay"]),
                           optimizer="adamw", warmup=int(finetune["warmup"]),
                           grad_clip=finetune.get("grad_clip"),
                           crop_scale=None if crop is None else (float(crop[0]), float(crop[1])),
                           train_projection=True)


@dataclass
class MultiTaskResult:
    losses: list[float] = field(default_factory=list)   # Σ_t mean CE_t of every step
    grad_norms: list[float] = field(default_factory=list)   # the gradient's norm, before any clipping
    resumed_at: int = 0                                  # the step a saved state resumed at (0: none)


# ---------------------------------------------------------------- the batches
def _epoch_order(n: int, seed: int, task: int, epoch: int) -> torch.Tensor:
    digest = hashlib.sha256(f"traditional_mtl/{seed}/{task}/{epoch}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randperm(n, generator=generator)


def step_indices(n: int, batch_size: int, seed: int, task: int, step: int) -> torch.Tensor:
    """Task `task`'s batch at `step`: positions [step·B, (step+1)·B) of the endless concatenation of
    per-epoch permutations (each seeded by (seed, task, epoch)), so every batch is full and an epoch
    sees every image once, as FusionBench's InfiniteDataLoader over a shuffled loader does."""
    start = step * batch_size
    epoch, pos = divmod(start, n)
    parts, need = [], batch_size
    while need > 0:
        order = _epoch_order(n, seed, task, epoch)[pos:pos + need]
        parts.append(order)
        need -= len(order)
        epoch, pos = epoch + 1, 0
    return torch.cat(parts)


class _ShardBatches(Sampler):
    """A DataLoader's batch sampler: this rank's shard of task `task`'s batch for steps
    [start, steps), so its workers may prefetch while the model trains."""

    def __init__(self, n: int, batch_size: int, seed: int, task: int, start: int, steps: int, part: range):
        self.args, self.start, self.steps, self.part = (n, batch_size, seed, task), start, steps, part

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.steps):
            yield step_indices(*self.args, step)[self.part.start:self.part.stop].tolist()

    def __len__(self) -> int:
        return self.steps - self.start


def _task_batches(images: TaskImages, batch_size: int, seed: int, task: int, start: int, steps: int,
                  part: range, num_workers: int, pin_memory: bool
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(images, labels) of this rank's shard at every step from `start`: from the preloaded tensors,
    else read by a DataLoader with the run's workers."""
    if images.preloaded:
        labels = images.labels
        for step in range(start, steps):
            idx = step_indices(len(images), batch_size, seed, task, step)[part.start:part.stop]
            yield images.images[idx], labels[idx]
        return
    sampler = _ShardBatches(len(images), batch_size, seed, task, start, steps, part)
    for x, y in DataLoader(images.dataset, batch_sampler=sampler, num_workers=num_workers,
                           pin_memory=pin_memory):
        yield x, torch.as_tensor(y).long()


# ---------------------------------------------------------------- the loop
def trainable_parameters(encoder: nn.Module, train_projection: bool) -> list[nn.Parameter]:
    """The vision tower's parameters (the text-side leftovers never train), without its output
    projection unless `train_projection` (FusionBench trains `vision_model`, not `visual_projection`)."""
    visual = encoder.visual
    proj = getattr(visual, "proj", None)
    return [p for p in visual.parameters() if train_projection or p is not proj]


def train_multitask(encoder: nn.Module, tasks: Sequence[str], data: Mapping[str, TaskImages],
                    heads: Mapping[str, nn.Module], recipe: MultiTaskRecipe, *, seed: int = 0,
                    checkpoint_dir: str | None = None, checkpoint_every: int = 100,
                    run_key: dict | None = None, logger=None, device: str | torch.device = "cpu",
                    num_workers: int = 0, pin_memory: bool = False,
                    on_step: Callable[[int], None] | None = None) -> MultiTaskResult:
    """Fine-tune `encoder` (an ImageEncoder) in place on every task's training data at once.

    `data[t]` holds task t's training images and labels; `heads[t]` its frozen zero-shot head.
    With `checkpoint_dir` the state is saved every `checkpoint_every` steps (and at the end) under a
    name keyed by `run_key` (the inputs) and the recipe, and a saved state of the same run is
    resumed. `on_step(k)` is called after step k (1-based) is done and saved."""
    device = torch.device(device)
    for t in tasks:
        if len(data[t]) == 0:
            raise ValueError(f"{t}: the training split is empty")
        heads[t].to(device).requires_grad_(False)
    encoder.to(device)
    encoder.requires_grad_(False)
    params = trainable_parameters(encoder, recipe.train_projection)
    for p in params:
        p.requires_grad_(True)
    make = torch.optim.Adam if recipe.optimizer == "adam" else torch.optim.AdamW
    opt = make(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    key = {"recipe": asdict(recipe), "seed": seed, "tasks": list(tasks), "run": run_key or {}}
    ckpt = TrainingCheckpoint(checkpoint_dir, "traditional_mtl", key, checkpoint_every)
    losses: list[float] = []
    grad_norms: list[float] = []
    start = 0
    say = logger.info if logger is not None else None
    state = ckpt.load(say)
    if state is not None:
        encoder.load_state_dict(state["encoder"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        start, losses, grad_norms = state["step"], list(state["losses"]), list(state["grad_norms"])
        if say:
            say(f"Resumed Traditional MTL from {ckpt.path} at step {start}")
    distributed.barrier()  # every rank has read the resume state before rank 0 may replace it

    world, part = distributed.world_size(), {t: distributed.shard(recipe.batch_size) for t in tasks}
    model = encoder
    if distributed.active():
        from torch.nn.parallel import DistributedDataParallel
        model = DistributedDataParallel(encoder, device_ids=[device] if device.type == "cuda" else None)
    streams = [_task_batches(data[t], recipe.batch_size, seed, i, start, recipe.steps, part[t],
                             num_workers, pin_memory) for i, t in enumerate(tasks)]
    encoder.train()
    bar = tqdm(range(start, recipe.steps), desc="Traditional MTL", initial=start, total=recipe.steps,
               dynamic_ncols=True)
    every = max(1, recipe.steps // 20)
    for step in bar:
        lr = cosine_lr(step, recipe.lr, recipe.warmup, recipe.steps)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64)
        for i, (t, stream) in enumerate(zip(tasks, streams)):
            x, y = next(stream)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if recipe.crop_scale is not None:  # the whole batch's boxes, from one generator
                boxes = crop_boxes(recipe.batch_size, gen, recipe.crop_scale)[part[t].start:part[t].stop]
                x = apply_crops(x, boxes)
            # DDP averages over the ranks: each rank's sum over its shard, divided by the whole
            # batch, times the world size, gives one process's mean CE once averaged
            last = i == len(tasks) - 1
            with model.no_sync() if (world > 1 and not last) else contextlib.nullcontext():
                ce = F.cross_entropy(heads[t](model(x)), y, reduction="sum") / recipe.batch_size
                (ce * world).backward()
            total += ce.detach().double().cpu()
        # without clipping (FusionBench) the norm is only measured: its ×1.0 leaves every bit
        clip = recipe.grad_clip if recipe.grad_clip is not None else float("inf")
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, clip)))
        opt.step()
        loss = float(distributed.all_reduce_sum(total.reshape(1))) if world > 1 else float(total)
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        if say and ((step + 1) % every == 0 or step + 1 == recipe.steps):
            say(f"Traditional MTL step {step + 1}/{recipe.steps}: loss {loss:.4f} (lr {lr:.3g})")
        ckpt.maybe_save(step + 1, lambda: {
            "encoder": {k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()},
            "optimizer": opt.state_dict(), "generator": gen.get_state(), "losses": losses,
            "grad_norms": grad_norms},
            final=step + 1 == recipe.steps)
        if on_step is not None:
            on_step(step + 1)
    bar.close()
    encoder.eval()
    encoder.requires_grad_(False)
    return MultiTaskResult(losses, grad_norms, start)
