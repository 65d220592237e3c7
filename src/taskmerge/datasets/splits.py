"""`<Task>Val`: the validation split held out of a task's training set (METHODS.md §5.1, §3.2).

As task_vectors/tall_masks: the training set is cut by `torch.utils.data.random_split` with a
generator seeded 0 into [train_size, val_size], val_size = min(int(0.1 · |train|), 5000); `.test`
is the held-out part, `.train` the rest. Its own module because every reader of a training set
uses it (registry.py's `get_task`, parquet.py, the embedded benchmark's tasks); registry.py
re-exports it.
"""
from __future__ import annotations

import torch
from torch.utils.data import random_split

from taskmerge.datasets.base import TaskData
from taskmerge.datasets.errors import DatasetLayoutError

VAL_FRACTION = 0.1
MAX_VAL_SAMPLES = 5000
VAL_SEED = 0


def val_sizes(n_train: int) -> tuple[int, int]:
    """(train_size, val_size) of a `<Task>Val` split of a training set of `n_train` samples."""
    val_size = min(int(n_train * VAL_FRACTION), MAX_VAL_SAMPLES)
    return n_train - val_size, val_size


def split_train_val(task: TaskData, name: str) -> TaskData:
    """`<Task>Val` from `<Task>`: the held-out part of the training set becomes `.test`."""
    where = task.info.get("root", "its data folder")
    if task.train is None:
        raise DatasetLayoutError(f"{name}: task {task.name} under {where} has no training split to "
                                 f"hold the validation split out from; add its train split (or a "
                                 f"validation split), or use a method that does not select on <Task>Val")
    train_size, val_size = val_sizes(len(task.train))
    if val_size == 0 or train_size == 0:
        raise DatasetLayoutError(
            f"{name}: the train split under {where} has {len(task.train)} samples, too few for a "
            f"{VAL_FRACTION:.0%} validation split (at least {int(1 / VAL_FRACTION)} are needed); the "
            f"download is incomplete or this is a cut-down copy: use the full train split, or a "
            f"method that does not select on <Task>Val")
    train, val = random_split(task.train, [train_size, val_size],
                              generator=torch.Generator().manual_seed(VAL_SEED))
    info = dict(task.info, test_split=f"random_split(train, seed {VAL_SEED})[1]")
    return TaskData(name, list(task.classnames), list(task.templates), test=val, train=train, info=info)
