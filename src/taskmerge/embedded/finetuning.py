"""Fine-tuning an image encoder against a frozen zero-shot head, as task_vectors does (METHODS.md §4.2).

Cross-entropy on head(encoder(x)), AdamW (weight decay 0.1 by default), a cosine schedule after a
linear warm-up, gradient-norm clipping at 1.0, a random-resized-crop augmentation (scale 0.9–1.0).
Only the vision tower is trained: the text-side leftovers of the ImageEncoder get no gradient in the
original either, so their task vectors stay exactly zero.

Images come in already normalised (N, 3, H, W) tensors, preloaded once, so the loop never touches
PIL; the augmentation therefore runs on tensors (one `grid_sample` per batch, bicubic).
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn


def cosine_lr(step: int, base_lr: float, warmup: int, steps: int) -> float:
    """task_vectors' `cosine_lr`: linear warm-up to `base_lr`, then half a cosine down to 0."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) * base_lr


def random_resized_crop(images: torch.Tensor, generator: torch.Generator,
                        scale: tuple[float, float] = (0.9, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """RandomResizedCrop on a batch: each image gets a crop of area `scale` (fraction of the image)
    and aspect `ratio` (log-uniform), resized back to the full size with bicubic interpolation.

    Same distribution of crops as torchvision's, except that crop sides are not rounded to whole
    pixels and a side that would exceed the image is clipped instead of re-drawn."""
    n = images.shape[0]
    area = torch.empty(n).uniform_(scale[0], scale[1], generator=generator)
    log_ratio = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = log_ratio.exp()
    w = (area * aspect).sqrt().clamp(max=1.0)  # crop width as a fraction of the image width
    h = (area / aspect).sqrt().clamp(max=1.0)
    # Centre of the crop, uniform over the positions that keep it inside the image ([-1, 1] coords).
    cx = (1 - w) * (2 * torch.rand(n, generator=generator) - 1)
    cy = (1 - h) * (2 * torch.rand(n, generator=generator) - 1)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = w, cx
    theta[:, 1, 1], theta[:, 1, 2] = h, cy
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bicubic", padding_mode="border", align_corners=False)


def batch_indices(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless shuffled batches: epoch after epoch of a fresh permutation, every batch full."""
    order = torch.empty(0, dtype=torch.long)
    while True:
        while len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        yield order[:batch_size]
        order = order[batch_size:]


def finetune_image_encoder(encoder: nn.Module, head: nn.Module, images: torch.Tensor,
                           labels: torch.Tensor, *, steps: int, batch_size: int, lr: float,
                           weight_decay: float = 0.1, warmup: int = 0, grad_clip: float = 1.0,
                           crop_scale: tuple[float, float] | None = (0.9, 1.0), seed: int = 0,
                           progress=None) -> list[float]:
    """Fine-tune `encoder.visual` in place on (images, labels) through the frozen `head`.

    `images` are normalised (N, 3, H, W); `progress` is an optional tqdm bar advanced once per step.
    Returns the training loss of every step."""
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in encoder.visual.parameters()]
    for p in encoder.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    head.requires_grad_(False)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    batches = batch_indices(len(labels), batch_size, generator)
    losses = []
    encoder.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, lr, warmup, steps)
        idx = next(batches)
        x = images[idx]
        if crop_scale is not None:
            x = random_resized_crop(x, generator, crop_scale)
        loss = F.cross_entropy(head(encoder(x)), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        losses.append(loss.item())
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return losses


# ---------------------------------------------------------------- several experts at once
# Fine-tuning the experts is embarrassingly parallel. Each runs single-threaded in a forked worker
# (fork, not spawn: spawn would re-run an entry script's top-level code in every worker), so the
# result is bit-identical to running them one after another with one thread. The jobs live in this
# module-global while the pool exists: forked workers inherit them without pickling.
_JOBS: list = []
_STEPS_DONE = None


class _SharedCounter:
    """Stands in for a tqdm bar inside a worker: counts steps in shared memory for the parent."""

    def update(self, n: int = 1) -> None:
        with _STEPS_DONE.get_lock():
            _STEPS_DONE.value += n

    def set_postfix(self, *args, **kwargs) -> None:
        pass


def _run_job(i: int) -> dict:
    torch.set_num_threads(1)
    job = _JOBS[i]
    encoder = job["encoder"]
    finetune_image_encoder(encoder, job["head"], job["images"], job["labels"],
                           progress=_SharedCounter() if _STEPS_DONE is not None else None,
                           **job["recipe"])
    return {k: v.detach().clone() for k, v in encoder.state_dict().items()}


def finetune_many(jobs: list[dict], workers: int = 2, progress=None) -> Iterator[dict]:
    """Run `finetune_image_encoder` for every job ({"encoder", "head", "images", "labels",
    "recipe": its keyword arguments}); yield the fine-tuned state dicts in order, each as soon as it
    is done (so a caller can save it before the next one finishes).

    Every job runs with one thread; `workers` > 1 forks that many processes where the platform can
    fork. Results do not depend on `workers`. `progress`, a tqdm bar, advances once per step."""
    global _JOBS, _STEPS_DONE
    import multiprocessing as mp
    workers = min(workers, len(jobs))
    if workers <= 1 or "fork" not in mp.get_all_start_methods():
        for job in jobs:
            yield _run_sequential(job, progress)
        return
    ctx = mp.get_context("fork")
    _JOBS, _STEPS_DONE = jobs, ctx.Value("l", 0)
    try:
        with ctx.Pool(workers) as pool:
            results = pool.imap(_run_job, range(len(jobs)), chunksize=1)
            for _ in jobs:
                while True:
                    try:
                        state = results.next(timeout=0.5)
                        break
                    except mp.TimeoutError:
                        if progress is not None:
                            progress.update(_STEPS_DONE.value - progress.n)
                if progress is not None:
                    progress.update(_STEPS_DONE.value - progress.n)
                yield state
    finally:
        _JOBS, _STEPS_DONE = [], None


def _run_sequential(job: dict, progress) -> dict:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        encoder = job["encoder"]
        finetune_image_encoder(encoder, job["head"], job["images"], job["labels"], progress=progress,
                               **job["recipe"])
        return {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    finally:
        torch.set_num_threads(before)
