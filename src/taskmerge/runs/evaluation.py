"""Accuracy and features over a task's test split (METHODS.md §1.4): non-shuffled, argmax, correct/N.

Under torchrun each rank evaluates a contiguous shard of the split and the counts (or rows) are
summed (or gathered) over ranks, so every rank returns the whole split's number.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from taskmerge.compute import distributed


@dataclass(frozen=True)
class LoaderSettings:
    """How the DataLoader feeds the device: decoding workers, pinned host memory for CUDA copies,
    and workers kept alive between the passes over one dataset (a search on val makes dozens)."""
    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = False

    @classmethod
    def for_device(cls, device: torch.device, num_workers: int) -> "LoaderSettings":
        return cls(num_workers=num_workers, pin_memory=device.type == "cuda",
                   persistent_workers=num_workers > 0)


_LOADERS: dict = {}   # (id(dataset), batch size, settings, shard) → DataLoader, for persistent workers


def _loader(dataset: Dataset, batch_size: int, settings: LoaderSettings | None) -> DataLoader:
    settings = settings or LoaderSettings()
    part = distributed.shard(len(dataset))
    key = (id(dataset), batch_size, settings, part.start, part.stop)
    cached = _LOADERS.get(key)
    if cached is not None and cached[0] is dataset:
        return cached[1]
    subset = dataset if len(part) == len(dataset) else Subset(dataset, part)
    loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=settings.num_workers,
                        pin_memory=settings.pin_memory,
                        persistent_workers=settings.persistent_workers and settings.num_workers > 0)
    if settings.persistent_workers and settings.num_workers > 0:
        _LOADERS[key] = (dataset, loader)   # the dataset is kept alive, so its id is not reused
    return loader


def _to(x: torch.Tensor, device, settings: LoaderSettings | None) -> torch.Tensor:
    return x.to(device, non_blocking=bool(settings and settings.pin_memory))


@torch.no_grad()
def compute_features(encoder: Callable[[torch.Tensor], torch.Tensor], dataset: Dataset,
                     batch_size: int = 128, desc: str | None = None,
                     device: str | torch.device = "cpu",
                     loader: LoaderSettings | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) of every test image in order; `encoder` maps images to features."""
    feats, labels = [], []
    for x, y in tqdm(_loader(dataset, batch_size, loader), desc=desc, leave=False, disable=desc is None):
        feats.append(encoder(_to(x, device, loader)).float().cpu())
        labels.append(torch.as_tensor(y))
    n = len(dataset)
    return distributed.gather_rows(torch.cat(feats), n), distributed.gather_rows(torch.cat(labels), n)


@torch.no_grad()
def accuracy_from_features(features: torch.Tensor, labels: torch.Tensor, head: nn.Module) -> float:
    logits = head(features.to(next(head.parameters()).device))
    return (logits.argmax(dim=-1).cpu() == labels).sum().item() / len(labels)


@torch.no_grad()
def evaluate(encoder: Callable[[torch.Tensor], torch.Tensor], head: nn.Module, dataset: Dataset,
             batch_size: int = 128, desc: str | None = None,
             device: str | torch.device = "cpu", loader: LoaderSettings | None = None) -> float:
    """Top-1 accuracy of head(encoder(x)) on `dataset`, a fraction in [0, 1]."""
    correct = total = 0
    for x, y in tqdm(_loader(dataset, batch_size, loader), desc=desc, leave=False, disable=desc is None):
        pred = head(encoder(_to(x, device, loader))).argmax(dim=-1).cpu()
        correct += (pred == torch.as_tensor(y)).sum().item()
        total += len(pred)
    correct, total = distributed.sum_counts(correct, total)
    if total == 0:
        raise ValueError(f"{desc or 'dataset'}: the test split is empty")
    return correct / total


def normalized_accuracy(accs: dict[str, float], individual: dict[str, float]) -> dict[str, float]:
    """merged ÷ individual fine-tuned accuracy per task (tall_masks/TSV's normalized accuracy)."""
    return {t: (a / individual[t] if individual.get(t) else float("nan")) for t, a in accs.items()}
