"""What a cache entry, a resume state or a saved artefact depends on, as JSON-able digests.

A cached or resumed value is reused only when every input that changes it matches, so each key
names them all: the checkpoints (`file_digest`: the sha256 of their bytes), the heads (a digest of
their values: a rebuilt head with the same values keeps its caches), the data (task, split, folder,
size, every label and file, and three transformed items) and the settings that produced the value.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Mapping

import torch
from torch.utils.data import Dataset

from taskmerge.adaptive.training_state import differing_fields  # noqa: F401 (re-exported)
from taskmerge.datasets.base import dataset_content_digest
from taskmerge.storage.checkpoints import file_digest

def short_hash(obj, n: int = 16) -> str:
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def as_json(obj):
    """`obj` as it reads back from a JSON file, so a stored key compares equal to a fresh one."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def tensor_digest(*tensors: torch.Tensor) -> str:
    """sha256 of the tensors' dtypes, shapes and bytes."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:32]


def head_digest(head) -> str:
    return tensor_digest(head.weight, head.bias)


def dataset_digest(dataset: Dataset) -> str:
    """The size and the first, middle and last (image, label): cheap on a real folder, and any
    re-split, re-transform or re-labelled build changes it."""
    n = len(dataset)
    h = hashlib.sha256(str(n).encode())
    for i in sorted({0, n // 2, n - 1}) if n else ():
        x, y = dataset[i]
        h.update(tensor_digest(torch.as_tensor(x)).encode())
        h.update(str(int(y)).encode())
    return h.hexdigest()[:32]


def data_identity(task: str, split: str, data_location: str, dataset: Dataset) -> dict:
    """`content` covers every label and every file the split reads (datasets.base); `items` is three
    transformed images, so a change of preprocessing changes the identity too."""
    return {"task": task, "split": split, "location": os.path.abspath(data_location),
            "n": len(dataset), "items": dataset_digest(dataset), "content": dataset_content_digest(dataset)}


def checkpoint_digests(checkpoints) -> dict[str, str]:
    """{"pretrained": digest, task: digest} of a CheckpointSet."""
    return {"pretrained": file_digest(checkpoints.zeroshot_path),
            **{t: file_digest(checkpoints.finetuned_path(t)) for t in checkpoints.tasks}}


def merge_settings(extra: Mapping, derived: tuple[str, ...] = ()) -> dict:
    """A merge's hyperparameters and chosen coefficients, without the fields `derived` from them
    (search curves, histories: they change with the inputs already keyed, and would only make a key
    long; each method declares its own, runs/registry.py `derived_fields`)."""
    return {k: v for k, v in extra.items() if k not in derived}
