"""`get_task(name, data_location, transform)`: one entry point for the real tasks.

A name is a real task (`READERS`) or its validation variant `<Task>Val` (the embedded benchmark's
tasks live a layer up, in `embedded/tasks.py`, and reuse `split_train_val`). `<Task>Val` follows
task_vectors/tall_masks (METHODS.md §5.1, §3.2; `split_train_val` in splits.py, re-exported here
with its constants): the training set is cut by `torch.utils.data.random_split` with a generator
seeded 0 into [train_size, val_size], val_size = min(int(0.1 · |train|), 5000); `.test` is the
held-out part, `.train` the rest. EuroSATVal instead evaluates on EuroSAT's real `val` folder. tall_masks derives
every other task's Val this way, the 12 extras included (RenderedSST2's and PCAM's own `valid`
splits are not used, as there).
"""
from __future__ import annotations

import os

from taskmerge.datasets.base import TaskData
from taskmerge.datasets.parquet import read_fer2013
from taskmerge.datasets.real import READERS as CORE_READERS
from taskmerge.datasets.real import read_eurosat
from taskmerge.datasets.splits import (MAX_VAL_SAMPLES, VAL_FRACTION, VAL_SEED,  # noqa: F401 (re-exported)
                                       split_train_val, val_sizes)
from taskmerge.datasets.tall_extras import READERS as EXTRA_READERS
from taskmerge.datasets.templates import base_task

# EnnengYang / EMR order: coefficient vectors and logs follow it.
PAPER_8 = ["SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD"]
# tall_masks / TSV order: the N-task benchmark is the first N of TALL_20.
TALL_8 = ["Cars", "DTD", "EuroSAT", "GTSRB", "MNIST", "RESISC45", "SVHN", "SUN397"]
TALL_14 = TALL_8 + ["STL10", "OxfordIIITPet", "Flowers102", "CIFAR100", "PCAM", "FER2013"]
TALL_20 = TALL_14 + ["CIFAR10", "Food101", "FashionMNIST", "RenderedSST2", "EMNIST", "KMNIST"]

# FER2013 is the one tall_masks task read from a Hugging Face parquet snapshot (parquet.py).
READERS = {**CORE_READERS, **EXTRA_READERS, "FER2013": read_fer2013}
REAL_TASKS = list(TALL_20)  # every task has a reader
# The names a `tasks` setting may give instead of a list (the first N of the tall_masks order, as
# tall_masks/TSV's `num_tasks=8|14|20`; PAPER8 is the same 8 in the EnnengYang order).
BENCHMARKS = {"PAPER8": PAPER_8, "TALL8": TALL_8, "TALL14": TALL_14, "TALL20": TALL_20}


def get_task(name: str, data_location: str, transform) -> TaskData:
    """The real task `name` (e.g. "MNIST", "MNISTVal") read from `data_location`.

    `transform` maps a PIL RGB image to what the model takes (the model layer's CLIP eval transform,
    `models.encoders.eval_transform`, in every run). Images are decoded only when indexed."""
    data_location = os.path.expanduser(os.fspath(data_location))
    base = base_task(name)
    if base in READERS:
        if name == "EuroSATVal":
            task = read_eurosat(data_location, transform, test_split="val")
            return TaskData(name, task.classnames, task.templates, test=task.test, train=task.train,
                            info=task.info)
        task = READERS[base](data_location, transform)
        return task if name == base else split_train_val(task, name)
    raise ValueError(_unknown_task_message(name))


def _unknown_task_message(name: str) -> str:
    return f"unknown task {name!r}; real tasks: {REAL_TASKS + [t + 'Val' for t in REAL_TASKS]}"
