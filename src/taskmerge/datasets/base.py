"""What every task looks like to the rest of the library, real or embedded."""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset, TensorDataset

from taskmerge.storage.digests import content_digest


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

    def update_content_hash(self, h) -> None:
        h.update(f"array {self.images.dtype} {self.images.shape}".encode())
        h.update(np.ascontiguousarray(self.images).data)
        h.update(self.labels.tobytes())

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


def file_stat_record(path: str) -> str:
    """A file's name and (size, mtime, ctime, inode): any write to it changes the ctime, which no user
    can set back, so this sees every edit without reading the bytes (a folder task has up to 10⁵
    images; reading them all for a cache key would cost minutes)."""
    st = os.stat(path)
    return f"{path}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}"


def file_content_record(path: str) -> str:
    """A data file's name and the sha256 of its bytes (remembered by storage.digests)."""
    return f"{os.path.abspath(path)}:{content_digest(path)}"


def dataset_content_digest(dataset: Dataset) -> str:
    """A digest of every label and every file (or in-memory image) a dataset reads, computed once per
    Dataset object. A split that is a `Subset` (the `<Task>Val` carve) adds its indices. A dataset
    that cannot say what it reads is digested item by item (every image and label)."""
    cached = getattr(dataset, "_taskmerge_content_digest", None)
    if cached is not None:
        return cached
    h = hashlib.sha256()
    hash_dataset_content(h, dataset)
    digest = h.hexdigest()[:32]
    try:
        dataset._taskmerge_content_digest = digest
    except AttributeError:
        pass
    return digest


def hash_dataset_content(h, dataset) -> None:
    h.update(f"{type(dataset).__name__} {len(dataset)}|".encode())
    if isinstance(dataset, Subset):
        h.update(np.asarray(dataset.indices, dtype=np.int64).tobytes())
        hash_dataset_content(h, dataset.dataset)
    elif hasattr(dataset, "update_content_hash"):
        dataset.update_content_hash(h)
    elif isinstance(dataset, TensorDataset):
        for t in dataset.tensors:
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    else:
        for i in range(len(dataset)):
            x, y = dataset[i]
            x = torch.as_tensor(x).detach().cpu().contiguous()
            h.update(f"{x.dtype}{tuple(x.shape)}:{int(y)}".encode())
            h.update(x.reshape(-1).view(torch.uint8).numpy().tobytes())
