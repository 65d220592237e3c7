"""The unlabeled test images a task adapts on (AdaMerging, Surgery): loaded once, sampled seeded.

The originals build a fresh dataset and a shuffled DataLoader on every step and keep its first two
batches of 16 (METHODS.md §2.4, §2.8): 32 images drawn without replacement per task per step.
`sample_batches` draws exactly that from a `torch.Generator`, so a run is seeded and resumable, and
the images themselves are read from the dataset once (preloaded as a tensor when they fit).
"""
from __future__ import annotations

import hashlib
from typing import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from taskmerge.datasets.base import stack_dataset

DEFAULT_MAX_PRELOAD_BYTES = 2 << 30


def sample_batches(n: int, generator: torch.Generator, batch_size: int = 16,
                   num_batches: int = 2) -> list[torch.Tensor]:
    """The first `num_batches` batches of index tensors of a freshly shuffled loader over n items."""
    perm = torch.randperm(n, generator=generator)
    return list(perm[: batch_size * num_batches].split(batch_size))


class TaskImages:
    """A task's test images for adaptation: a preloaded (images, labels) pair, or the Dataset read
    per index when preloading would not fit (`max_preload_bytes`; real SUN397 is ~12 GB as float)."""

    def __init__(self, dataset: Dataset | None = None, preload: bool | str = "auto",
                 max_preload_bytes: int = DEFAULT_MAX_PRELOAD_BYTES, num_workers: int = 0,
                 name: str = "task", pin_memory: bool = False):
        self.dataset, self.name, self.num_workers, self.pin_memory = dataset, name, num_workers, pin_memory
        self.images: torch.Tensor | None = None
        self._labels: torch.Tensor | None = None
        if dataset is None:
            return
        if len(dataset) == 0:
            raise ValueError(f"{name}: the test split is empty; check the dataset folder")
        if preload == "auto":
            first = dataset[0][0]
            preload = first.numel() * first.element_size() * len(dataset) <= max_preload_bytes
        if preload and num_workers > 0:  # decoded by the loader's workers, in dataset order
            xs, ys = zip(*DataLoader(dataset, batch_size=256, shuffle=False, num_workers=num_workers))
            self.images, self._labels = torch.cat(xs), torch.cat([torch.as_tensor(y) for y in ys]).long()
        elif preload:
            self.images, self._labels = stack_dataset(dataset)

    @classmethod
    def from_tensors(cls, images: torch.Tensor, labels: torch.Tensor, name: str = "task") -> "TaskImages":
        if len(images) != len(labels) or len(images) == 0:
            raise ValueError(f"{name}: {len(images)} images and {len(labels)} labels (need equal, > 0)")
        out = cls(None, name=name)
        out.images, out._labels = images, torch.as_tensor(labels, dtype=torch.long)
        return out

    def __len__(self) -> int:
        return len(self.images) if self.images is not None else len(self.dataset)

    @property
    def preloaded(self) -> bool:
        return self.images is not None

    def take(self, indices: torch.Tensor | Sequence[int]) -> torch.Tensor:
        """The images at `indices` (in that order), as one batch."""
        if self.images is not None:
            return self.images[torch.as_tensor(indices, dtype=torch.long)]
        return torch.stack([self.dataset[int(i)][0] for i in indices])

    def batches(self, batch_size: int, part: range | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images, labels) in dataset order, of `part` (a contiguous range of indices: a rank's
        shard) or of all; a full pass over a Dataset also records the labels."""
        lo, hi = (0, len(self)) if part is None else (part.start, part.stop)
        if self.images is not None:
            for start in range(lo, hi, batch_size):
                end = min(start + batch_size, hi)
                yield self.images[start:end], self._labels[start:end]
            return
        whole = (lo, hi) == (0, len(self))
        seen = []
        for x, y in DataLoader(self.dataset if whole else Subset(self.dataset, range(lo, hi)),
                               batch_size=batch_size, shuffle=False, num_workers=self.num_workers,
                               pin_memory=self.pin_memory):
            y = torch.as_tensor(y)
            seen.append(y)
            yield x, y
        if whole:
            self._labels = torch.cat(seen)

    @property
    def labels(self) -> torch.Tensor:
        if self._labels is None:
            for _ in self.batches(256):  # reads every image once; evaluation passes record them too
                pass
        return self._labels

    def _item(self, i: int) -> tuple[torch.Tensor, int]:
        if self.images is not None:
            return self.images[i], int(self._labels[i])
        x, y = self.dataset[i]
        return x, int(y)

    def fingerprint(self) -> str:
        """A cheap content digest (size, first/middle/last image and label) for cache keys."""
        h = hashlib.sha256(str(len(self)).encode())
        for i in sorted({0, len(self) // 2, len(self) - 1}):
            x, y = self._item(i)
            h.update(x.float().contiguous().numpy().tobytes())
            h.update(str(y).encode())
        return h.hexdigest()[:16]
