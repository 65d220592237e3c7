"""The pieces of task_vectors' fine-tuning recipe that every fine-tuning loop shares: the cosine
schedule after a linear warm-up, a random-resized-crop augmentation on normalised tensors, and an
endless stream of shuffled batches. The embedded benchmark's pretraining and experts
(embedded/finetuning.py) and Traditional MTL (adaptive/multitask.py) use them.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F


def cosine_lr(step: int, base_lr: float, warmup: int, steps: int) -> float:
    """task_vectors' `cosine_lr`: linear warm-up to `base_lr`, then half a cosine down to 0."""
    if step < warmup:
        return base_lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1 + math.cos(math.pi * progress)) * base_lr


def crop_boxes(n: int, generator: torch.Generator, scale: tuple[float, float] = (0.9, 1.0),
               ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """The (n, 2, 3) affine boxes of `random_resized_crop`, drawn from `generator`: a run that
    crops only part of a batch (one rank's shard) draws the whole batch's boxes and keeps its rows."""
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
    return theta


def apply_crops(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Each image's box of `crop_boxes`, resized back to the full size (bicubic)."""
    grid = F.affine_grid(theta.to(images.device, images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bicubic", padding_mode="border", align_corners=False)


def random_resized_crop(images: torch.Tensor, generator: torch.Generator,
                        scale: tuple[float, float] = (0.9, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """RandomResizedCrop on a batch: each image gets a crop of area `scale` (fraction of the image)
    and aspect `ratio` (log-uniform), resized back to the full size with bicubic interpolation.

    Same distribution of crops as torchvision's, except that crop sides are not rounded to whole
    pixels and a side that would exceed the image is clipped instead of re-drawn."""
    return apply_crops(images, crop_boxes(images.shape[0], generator, scale, ratio))


def batch_indices(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless shuffled batches: epoch after epoch of a fresh permutation, every batch full."""
    order = torch.empty(0, dtype=torch.long)
    while True:
        while len(order) < batch_size:
            order = torch.cat([order, torch.randperm(n, generator=generator)])
        yield order[:batch_size]
        order = order[batch_size:]
