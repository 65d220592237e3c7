"""What every task looks like to the rest of the library, real or embedded."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset


@dataclass
class TaskData:
    """One classification task: class names and prompt templates (format strings with `{c}`),
    and its splits as torch Datasets yielding `(image_tensor, label)`.

    `test` is the split that is evaluated (and, for AdaMerging/Surgery, adapted on); for a `<Task>Val`
    name it is the held-out validation part of the training set (random_split, seed 0)."""
    name: str
    classnames: list[str]
    templates: list[str]
    test: Dataset
    train: Dataset | None = None
    info: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classnames)


class ArrayDataset(Dataset):
    """uint8 images (N, H, W) or (N, H, W, C) held in memory; the transform sees a PIL RGB image,
    so the embedded benchmark goes through the same CLIP eval transform as real data."""

    def __init__(self, images: np.ndarray, labels: Sequence[int], transform: Callable | None = None):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i]).convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[i])


def stack_dataset(dataset: Dataset, indices: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialise (images, labels) for `indices` (all by default): used to load a task once."""
    idx = range(len(dataset)) if indices is None else indices
    xs, ys = zip(*(dataset[i] for i in idx))
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long)
