"""Accuracy and features over a task's test split (METHODS.md §1.4): non-shuffled, argmax, correct/N."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm


def _loader(dataset: Dataset, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0)


@torch.no_grad()
def compute_features(encoder: Callable[[torch.Tensor], torch.Tensor], dataset: Dataset,
                     batch_size: int = 128, desc: str | None = None,
                     device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(features, labels) of every test image in order; `encoder` maps images to features."""
    feats, labels = [], []
    for x, y in tqdm(_loader(dataset, batch_size), desc=desc, leave=False, disable=desc is None):
        feats.append(encoder(x.to(device)).float().cpu())
        labels.append(torch.as_tensor(y))
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def accuracy_from_features(features: torch.Tensor, labels: torch.Tensor, head: nn.Module) -> float:
    logits = head(features.to(next(head.parameters()).device))
    return (logits.argmax(dim=-1).cpu() == labels).sum().item() / len(labels)


@torch.no_grad()
def evaluate(encoder: Callable[[torch.Tensor], torch.Tensor], head: nn.Module, dataset: Dataset,
             batch_size: int = 128, desc: str | None = None,
             device: str | torch.device = "cpu") -> float:
    """Top-1 accuracy of head(encoder(x)) on `dataset`, a fraction in [0, 1]."""
    correct = total = 0
    for x, y in tqdm(_loader(dataset, batch_size), desc=desc, leave=False, disable=desc is None):
        pred = head(encoder(x.to(device))).argmax(dim=-1).cpu()
        correct += (pred == torch.as_tensor(y)).sum().item()
        total += len(pred)
    if total == 0:
        raise ValueError(f"{desc or 'dataset'}: the test split is empty")
    return correct / total


def normalized_accuracy(accs: dict[str, float], individual: dict[str, float]) -> dict[str, float]:
    """merged ÷ individual fine-tuned accuracy per task (tall_masks/TSV's normalized accuracy)."""
    return {t: (a / individual[t] if individual.get(t) else float("nan")) for t, a in accs.items()}
