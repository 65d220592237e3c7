"""Fine-tuning an image encoder against a frozen zero-shot head, as task_vectors does (METHODS.md §4.2).

Cross-entropy on head(encoder(x)), AdamW (weight decay 0.1 by default), a cosine schedule after a
linear warm-up, gradient-norm clipping at 1.0, a random-resized-crop augmentation (scale 0.9–1.0).
Only the vision tower is trained: the text-side leftovers of the ImageEncoder get no gradient in the
original either, so their task vectors stay exactly zero.

Images come in already normalised (N, 3, H, W) tensors, preloaded once, so the loop never touches
PIL; the augmentation therefore runs on tensors (one `grid_sample` per batch, bicubic).
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

# the recipe's schedule, crop and batches live a layer down, shared with Traditional MTL
from taskmerge.adaptive.fine_tuning import batch_indices, cosine_lr, random_resized_crop  # noqa: F401


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
