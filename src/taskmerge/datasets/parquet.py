"""Readers of the Hugging Face parquet datasets that FusionBench and the seeds point to (METHODS.md §4.3,
issue #13 §2): `tanganke/<task>` and the others below, for all 20 tasks of TALL_20.

A dataset is a hub snapshot of parquet shards, one or more per split (`data/train-00000-of-00002.parquet`,
`cropped_digits/test-00000-of-00001.parquet`, or the converted `<config>/<split>/0000.parquet`), with an
image column (HF's `{"bytes": ..., "path": ...}` struct, or plain bytes) and an integer label column.
`get_parquet_task(name, root, transform)` finds it under `root` as a folder of its own
(`hf download <repo> --repo-type dataset --local-dir <root>/<name>`) or in the hub cache layout
(`<root>/datasets--<org>--<name>/snapshots/<rev>/`, the revision `refs/main` names).

Read with pyarrow, not the `datasets` package: pyarrow is one wheel that reads parquet and nothing
else, while `datasets` brings fsspec, the hub client, multiprocess and its own cache (and would try the
network for a repo id); here nothing can download, and a snapshot on disk is all we need.

Lazy: construction reads each shard's footer and its label column only (labels are checked against the
task's class count there, naming the file and value); an image is decoded in `__getitem__`, from the
bytes of the one row group that holds it (the last row group read is kept, undecoded). Class names and
templates are ours (`templates.py`); only the tasks whose originals take names from the data (SUN397,
Cars, CIFAR100, Food101, OxfordIIITPet) take them from the dataset's own `ClassLabel` names, spelled
as the dataset spells them (underscores kept; runs/heads.py says which names build a head). For the
others the dataset's `ClassLabel` names are checked against ours (`check_label_order`): a dataset may
word its classes differently (our names are the originals' prompt wording, e.g. GTSRB's "stop" sign
descriptions, EuroSAT's "annual crop land"; FusionBench's names and the folder names are accepted
too), but a dataset whose class i carries our name of class j ≠ i numbers its labels in another
order, and is refused; so is one with a name that is none of ours (its order cannot be checked),
unless the user has checked it and sets `trust_label_order=True`. Every shard of every split is
checked, not only the first.

`<Task>Val` (the held-out split that α / λ are chosen on): the dataset's own `validation` split where it
has one besides the test split (FusionBench's convention for model selection), else the originals'
split_train_val (splits.py: random_split of `train`, seed 0). The hub's train splits are not guaranteed
to list images in torchvision's order, so the second case is the same recipe, not necessarily the
same images, as tall_masks' `<Task>Val`.
"""
from __future__ import annotations

import bisect
import io
import json
import os
import re
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from torch.utils.data import Dataset

from taskmerge.datasets.base import TaskData, file_content_record
from taskmerge.datasets.errors import DatasetLayoutError
from taskmerge.datasets.fusionbench_classnames import CLASSNAMES as FUSIONBENCH_CLASSNAMES
from taskmerge.datasets.splits import split_train_val
from taskmerge.datasets.templates import (CLASSNAMES, DATA_NAMED_COUNTS, DTD_FOLDERS, EUROSAT_FOLDERS,
                                          FER2013_NAMES, FER2013_SYNONYMS, GTSRB_FOLDERS, base_task,
                                          class_order_problem, dtd_classname, eurosat_classname,
                                          get_templates)


@dataclass(frozen=True)
class HFSource:
    """Where a task's parquet copy lives on the hub, and how FusionBench names it."""
    repo: str | None            # hub dataset id; None where no copy of the originals' split is known
    fusionbench: str            # FusionBench's task name (its model is `…-patch32_<fusionbench>`)
    config: str | None = None   # the config folder to read where the repo holds several
    test_split: str = "test"    # the split FusionBench evaluates


# FusionBench's dataset configs (config/dataset/image_classification/test/*.yaml), METHODS.md §4.3, §5.2.
HF_SOURCES: dict[str, HFSource] = {
    "SUN397": HFSource("tanganke/sun397", "sun397"),
    "Cars": HFSource("tanganke/stanford_cars", "stanford-cars"),
    "RESISC45": HFSource("tanganke/resisc45", "resisc45"),
    "EuroSAT": HFSource("tanganke/eurosat", "eurosat"),
    "SVHN": HFSource("ufldl-stanford/svhn", "svhn", config="cropped_digits"),
    "GTSRB": HFSource("tanganke/gtsrb", "gtsrb"),
    "MNIST": HFSource("ylecun/mnist", "mnist"),
    "DTD": HFSource("tanganke/dtd", "dtd"),
    "STL10": HFSource("tanganke/stl10", "stl10"),
    "OxfordIIITPet": HFSource("timm/oxford-iiit-pet", "oxford-iiit-pet"),
    "Flowers102": HFSource("dpdl-benchmark/oxford_flowers102", "oxford_flowers102"),
    "CIFAR100": HFSource("tanganke/cifar100", "cifar100"),
    "PCAM": HFSource("1aurent/PatchCamelyon", "pcam"),
    # FusionBench reads FER2013 from a webdataset (clip-benchmark/wds_fer2013), not parquet.
    "FER2013": HFSource("Jeneral/fer-2013", "fer2013"),
    "CIFAR10": HFSource("tanganke/cifar10", "cifar10"),
    "Food101": HFSource("ethz/food101", "food101", test_split="validation"),
    "FashionMNIST": HFSource("zalando-datasets/fashion_mnist", "fashion_mnist"),
    "RenderedSST2": HFSource("nateraw/rendered-sst2", "rendered-sst2"),
    # tall_masks' EMNIST is the "digits" split (test 40,000); the hub has no copy of it that we know.
    "EMNIST": HFSource(None, "emnist"),
    "KMNIST": HFSource("tanganke/kmnist", "kmnist"),
}

# FusionBench names (and the repo names) → ours.
FUSIONBENCH_TASKS: dict[str, str] = {s.fusionbench: t for t, s in HF_SOURCES.items()}
FUSIONBENCH_TASKS.update({s.repo.split("/")[1]: t for t, s in HF_SOURCES.items() if s.repo})

# FusionBench names that look like one of ours but are another task: refused, not mapped.
NOT_OUR_TASKS = {
    "emnist_letters": "EMNIST letters (26 classes); tall_masks' EMNIST is the 10-class 'digits' split",
    "emnist_mnist": "EMNIST's 'mnist' split (test 10,000); tall_masks' EMNIST is 'digits' (test 40,000)",
}

# Class counts of the tasks whose names come from the data.
DATA_NAMED = DATA_NAMED_COUNTS

FIXED_CLASSNAMES: dict[str, list[str]] = dict(
    CLASSNAMES, DTD=[dtd_classname(f) for f in DTD_FOLDERS],
    EuroSAT=[eurosat_classname(f) for f in EUROSAT_FOLDERS])

# Column names in the order they are tried (FusionBench renames FER2013's `jpg`/`cls` the same way).
IMAGE_COLUMNS = ("image", "img", "jpg", "img_bytes")  # img_bytes: Jeneral/fer-2013, tall_masks' FER2013
LABEL_COLUMNS = ("label", "labels", "fine_label", "cls")
VALIDATION_SPLITS = ("validation", "valid", "val")
GRAYSCALE_TASKS = ("FER2013",)

_SHARD = re.compile(r"^(?P<split>[A-Za-z0-9_]+?)-\d{5}-of-\d{5}")


def task_name(name: str) -> str:
    """Our task name for `name`: ours (`Cars`, `CarsVal`) or FusionBench's (`stanford-cars`)."""
    if name in NOT_OUR_TASKS:
        raise DatasetLayoutError(f"dataset {name!r} is not one of our tasks: it is {NOT_OUR_TASKS[name]}")
    if name in FUSIONBENCH_TASKS:
        return FUSIONBENCH_TASKS[name]
    if base_task(name) in HF_SOURCES:
        return name
    raise DatasetLayoutError(f"unknown task {name!r}; parquet tasks: {sorted(HF_SOURCES)} (with Val) or "
                             f"FusionBench's names {sorted(s.fusionbench for s in HF_SOURCES.values())}")


def download_hint(task: str, root: str) -> str:
    src = HF_SOURCES[task]
    if src.repo is None:
        return (f"no hub copy of {task} is known: write its splits as parquet shards "
                f"(data/<split>-00000-of-00001.parquet, columns image and label) under "
                f"{os.path.join(root, src.fusionbench)}")
    return (f"download it once with: hf download {src.repo} --repo-type dataset "
            f"--local-dir {_dataset_folder(task, root)}")


def _dataset_folder(task: str, path: str) -> str:
    """The dataset's own folder for `--local-dir`: `path` itself or the ancestor named after the
    dataset when `path` lies inside it (a shard's `…/eurosat/data`), else `<path>/<name>`."""
    src = HF_SOURCES[task]
    name, cache = src.repo.split("/")[1], "datasets--" + src.repo.replace("/", "--")
    folder = os.path.abspath(path)
    while os.path.dirname(folder) != folder:
        if os.path.basename(folder) in (name, src.fusionbench):
            return folder
        if os.path.basename(folder) == cache:  # inside the hub cache: beside `hub/`, where we look too
            base = os.path.dirname(folder)
            return os.path.join(os.path.dirname(base) if os.path.basename(base) == "hub" else base, name)
        folder = os.path.dirname(folder)
    return os.path.join(path, name)


# ---------------------------------------------------------------- finding the snapshot and its shards
def _cache_snapshot(task: str, cache_dir: str) -> str:
    """`datasets--org--name/` → its `snapshots/<rev>/`, the revision `refs/main` names."""
    ref = os.path.join(cache_dir, "refs", "main")
    snapshots = os.path.join(cache_dir, "snapshots")
    if os.path.isfile(ref):
        with open(ref) as f:
            rev = f.read().strip()
        path = os.path.join(snapshots, rev)
        if not os.path.isdir(path):
            raise DatasetLayoutError(f"{task}: {ref} names revision {rev!r}, but {path} does not exist; "
                                     f"the hub cache is incomplete. {download_hint(task, cache_dir)}")
        return path
    revs = sorted(os.listdir(snapshots)) if os.path.isdir(snapshots) else []
    if len(revs) != 1:
        raise DatasetLayoutError(f"{task}: hub cache {cache_dir} has no refs/main and {len(revs)} "
                                 f"snapshots ({revs[:3]}); keep one, or write the revision to {ref}")
    return os.path.join(snapshots, revs[0])


def find_snapshot(task: str, root: str) -> str:
    """The folder holding `task`'s parquet shards under `root` (see the module docstring)."""
    src = HF_SOURCES[task]
    if src.repo:
        cache_name = "datasets--" + src.repo.replace("/", "--")
        if os.path.basename(os.path.normpath(root)) == cache_name:
            return _cache_snapshot(task, root)
        for cache_dir in (os.path.join(root, cache_name), os.path.join(root, "hub", cache_name)):
            if os.path.isdir(cache_dir):
                return _cache_snapshot(task, cache_dir)
    names = [src.repo.split("/")[1]] if src.repo else []
    for name in dict.fromkeys(names + [src.fusionbench, task]):
        if os.path.isdir(os.path.join(root, name)):
            return os.path.join(root, name)
    if not _holds_datasets(root) and any(f.endswith(".parquet") for _, _, fs in _walk(root) for f in fs):
        return root  # `root` is the dataset's own folder
    raise DatasetLayoutError(f"{task}: no parquet dataset found under {root} (looked for "
                             f"{', '.join(names + [src.fusionbench])} and the hub cache's "
                             f"datasets--…); {download_hint(task, root)}")


def _holds_datasets(root: str) -> bool:
    """Whether `root` is a folder of several datasets (then a task missing from it is an error, not
    a reason to read the others' shards as its own)."""
    known = {t for t in HF_SOURCES} | set(FUSIONBENCH_TASKS) | set(NOT_OUR_TASKS)
    entries = os.listdir(root) if os.path.isdir(root) else []
    return any(e in known or e.startswith("datasets--") or e == "hub" for e in entries)


def _walk(top: str):
    for folder, dirs, files in os.walk(top):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # .cache/ of `hf download`
        yield folder, dirs, files


def shard_split(relpath: str) -> str:
    """The split a shard belongs to: `data/train-00000-of-00002.parquet`, `test-….parquet` →
    its name's prefix; `default/train/0000.parquet` (the hub's converted layout) → its folder."""
    name = os.path.basename(relpath)
    m = _SHARD.match(name)
    if m:
        return m["split"]
    stem = name[: -len(".parquet")]
    return os.path.basename(os.path.dirname(relpath)) if stem.isdigit() else stem


def list_shards(task: str, snapshot: str, root: str) -> dict[str, list[str]]:
    """split → its shards, in shard order. A config folder (SVHN's `cropped_digits`) narrows the
    search; a split whose shards lie in two folders (two configs) is refused as ambiguous."""
    src = HF_SOURCES[task]
    found: dict[str, list[str]] = {}
    for folder, _, files in _walk(snapshot):
        for f in sorted(files):
            rel = os.path.relpath(os.path.join(folder, f), snapshot)
            if f.endswith(".parquet") and (src.config is None or src.config in rel.split(os.sep)):
                found.setdefault(shard_split(rel), []).append(os.path.join(folder, f))
    if not found:
        raise DatasetLayoutError(f"{task}: no parquet shards in {snapshot}"
                                 f"{f' (config folder {src.config}/)' if src.config else ''}; "
                                 f"{download_hint(task, root)}")
    for split, files in found.items():
        folders = sorted({os.path.dirname(f) for f in files})
        if len(folders) > 1:
            raise DatasetLayoutError(f"{task}: split {split!r} has shards in {len(folders)} folders "
                                     f"({', '.join(folders[:3])}); keep one config's folder")
    return {split: sorted(files) for split, files in found.items()}


# ---------------------------------------------------------------- the dataset
def _column(task: str, path: str, schema: pa.Schema, candidates: tuple[str, ...], what: str,
            fix: str) -> str:
    for name in candidates:
        if name in schema.names:
            return name
    raise DatasetLayoutError(f"{task}: {path} has no {what} column (looked for {', '.join(candidates)}; "
                             f"columns: {', '.join(schema.names)}); {fix}")


def hf_classlabel_names(schema: pa.Schema, column: str) -> list[str] | None:
    """The `ClassLabel` names HF writes into the schema metadata (`huggingface` key), if any."""
    meta = (schema.metadata or {}).get(b"huggingface")
    if not meta:
        return None
    try:
        feature = json.loads(meta).get("info", {}).get("features", {}).get(column, {})
    except (ValueError, AttributeError):
        return None  # not HF's metadata: the class count is still checked against the labels
    return list(feature["names"]) if feature.get("_type") == "ClassLabel" and "names" in feature else None


class ParquetImageDataset(Dataset):
    """The rows of one split's shards as `(image, label)`; an image is decoded only when indexed."""

    def __init__(self, task: str, files: list[str], num_classes: int, transform: Callable | None,
                 fix: str = "re-download the dataset"):
        self.task, self.files, self.transform, self.fix = task, list(files), transform, fix
        self.groups: list[tuple[int, int]] = []   # (file index, row group) of each row group
        self.starts: list[int] = []               # first row of each row group
        self.image_columns: list[str] = []
        self.classlabel_names: list[str] | None = None  # the first shard's that has them
        self.shard_names: list[tuple[str, list[str] | None]] = []  # (shard, its ClassLabel names)
        labels, n = [], 0
        for k, path in enumerate(self.files):
            try:
                pf = pq.ParquetFile(path)
            except (OSError, pa.ArrowException) as e:
                raise DatasetLayoutError(f"{task}: cannot read parquet file {path} ({e}); {fix}") from e
            schema = pf.schema_arrow
            self.image_columns.append(_column(task, path, schema, IMAGE_COLUMNS, "image", fix))
            label_column = _column(task, path, schema, LABEL_COLUMNS, "label", fix)
            names = hf_classlabel_names(schema, label_column)
            self.shard_names.append((path, names))
            self.classlabel_names = self.classlabel_names or names
            try:
                column = pf.read(columns=[label_column]).column(0)
            except (OSError, pa.ArrowException) as e:  # a corrupt page of the label column
                raise DatasetLayoutError(f"{task}: cannot read the {label_column!r} column of parquet "
                                         f"file {path} ({type(e).__name__}: {e}); the file is corrupt: "
                                         f"{fix}") from None
            labels.append(self._labels(path, column, num_classes))
            for rg in range(pf.metadata.num_row_groups):
                self.groups.append((k, rg))
                self.starts.append(n)
                n += pf.metadata.row_group(rg).num_rows
        self.labels = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
        self._cached: tuple[int, pa.Array] | None = None

    def _labels(self, path: str, column: pa.ChunkedArray, num_classes: int) -> np.ndarray:
        if column.null_count:
            raise DatasetLayoutError(f"{self.task}: {path} has {column.null_count} rows without a label")
        if pa.types.is_boolean(column.type):  # PCAM's labels are booleans
            column = column.cast(pa.int64())
        if not pa.types.is_integer(column.type):
            raise DatasetLayoutError(f"{self.task}: {path} has labels of type {column.type}, expected "
                                     f"integer class ids 0..{num_classes - 1}")
        labels = column.to_numpy().astype(np.int64)
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if bad.size:
            raise DatasetLayoutError(f"{self.task}: {path} has label {int(bad[0])}, outside the task's "
                                     f"{num_classes} classes (0..{num_classes - 1}); this is not "
                                     f"{self.task}'s dataset, or a different variant of it")
        return labels

    def __len__(self) -> int:
        return len(self.labels)

    def update_content_hash(self, h) -> None:
        for path in self.files:
            h.update(f"{file_content_record(path)}\n".encode())
        h.update(self.labels.tobytes())

    def __getstate__(self):  # DataLoader workers re-read their own row groups
        return dict(self.__dict__, _cached=None)

    def _row_group_images(self, g: int) -> pa.Array:
        if self._cached is None or self._cached[0] != g:
            k, rg = self.groups[g]
            try:
                table = pq.ParquetFile(self.files[k]).read_row_group(rg, columns=[self.image_columns[k]])
            except (OSError, pa.ArrowException) as e:  # a corrupt data page (pyarrow checks it here)
                raise DatasetLayoutError(f"{self.task}: cannot read row group {rg} of parquet file "
                                         f"{self.files[k]} ({type(e).__name__}: {e}); the file is "
                                         f"corrupt: {self.fix}") from None
            self._cached = (g, table.column(0).combine_chunks())
        return self._cached[1]

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(f"{self.task}: index {i} out of range for {len(self)} rows")
        g = bisect.bisect_right(self.starts, i) - 1
        cell = self._row_group_images(g)[i - self.starts[g]].as_py()
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        path = self.files[self.groups[g][0]]
        if not data:
            raise DatasetLayoutError(f"{self.task}: row {i} of {path} holds no image bytes (only a path, "
                                     f"{cell.get('path') if isinstance(cell, dict) else None!r}); "
                                     f"the hub's parquet files embed the images: {self.fix}")
        try:
            img = Image.open(io.BytesIO(data))
            # FER2013 as tall_masks reads it: grayscale first, then the RGB every encoder takes
            img = (img.convert("L") if self.task in GRAYSCALE_TASKS else img).convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise DatasetLayoutError(f"{self.task}: cannot decode the image in row {i} of {path} "
                                     f"({type(e).__name__}: {e}); {self.fix}") from e
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[i])


def label_spellings(task: str) -> list[list[str]]:
    """The names accepted for each class of a task with fixed names: ours, FusionBench's (its
    datasets are these hub copies, in this order), the originals' folder names (EuroSAT, DTD, GTSRB)
    and FER2013's own class names (the challenge's "disgust", "fear", "surprise")."""
    lists = [FIXED_CLASSNAMES[task], FUSIONBENCH_CLASSNAMES.get(task),
             {"EuroSAT": EUROSAT_FOLDERS, "DTD": DTD_FOLDERS, "GTSRB": GTSRB_FOLDERS,
              "FER2013": FER2013_NAMES}.get(task)]
    spellings = [[name] for name in FIXED_CLASSNAMES[task]]
    for names in lists[1:]:
        if names is not None and len(names) == len(spellings):
            for j, name in enumerate(names):
                spellings[j].append(name)
    if task == "FER2013":
        for j, synonyms in enumerate(FER2013_SYNONYMS):
            spellings[j].extend(synonyms)
    return spellings


def check_label_order(task: str, path: str, dataset_names: list[str], ours: list[str],
                      trust_label_order: bool = False) -> None:
    """Refuse a dataset whose `ClassLabel` names put one of our classes at another label id, and,
    unless `trust_label_order`, one with a name that is none of our classes' (its order cannot be
    checked: it is not taken to be right)."""
    spellings = label_spellings(task) if ours == FIXED_CLASSNAMES.get(task) else [[n] for n in ours]
    problem = class_order_problem(dataset_names, spellings)
    if problem is None:
        return
    i, j = problem
    if j is not None:
        raise DatasetLayoutError(
            f"{task}: {path} numbers its classes in another order than ours: its label {i} is "
            f"{dataset_names[i]!r}, which is our class {j} ({ours[j]!r}; our class {i} is "
            f"{ours[i]!r}). The heads would score every image against the wrong class; this is "
            f"a different variant of {task}'s dataset: {download_hint(task, os.path.dirname(path))}")
    if trust_label_order:
        return
    unknown = [n for k, n in enumerate(dataset_names)
               if class_order_problem([n], [spellings[k]]) is not None][:3]
    raise DatasetLayoutError(
        f"{task}: {path} names its label {i} {dataset_names[i]!r}, which is none of our {task} "
        f"class names (ours for label {i}: {ours[i]!r}; unmatched names {unknown}), so its label order "
        f"cannot be checked. Use the dataset FusionBench evaluates on ({download_hint(task, os.path.dirname(path))}), "
        f"or, once you have checked that its label i is our class i (datasets/templates.py "
        f"CLASSNAMES), set trust_label_order=True")


def check_shard_names(task: str, splits: list[ParquetImageDataset], trust_label_order: bool = False) -> None:
    """Every shard's ClassLabel names, of every split: of our class count, and, for a task with
    fixed names, in our order (`check_label_order`); a task named by the data must have the same
    names, in the same order, in every shard (the heads are built from one of them)."""
    named = [(path, names) for split in splits for path, names in split.shard_names if names is not None]
    count = num_classes(task)
    for path, names in named:
        if len(names) != count:
            raise DatasetLayoutError(f"{task}: {path} names {len(names)} classes, {task} has {count}; "
                                     f"this is not {task}'s dataset")
        if task in FIXED_CLASSNAMES:
            check_label_order(task, path, names, FIXED_CLASSNAMES[task], trust_label_order)
        elif names != named[0][1]:
            i = next(k for k, (a, b) in enumerate(zip(names, named[0][1])) if a != b)
            raise DatasetLayoutError(
                f"{task}: {path} names its label {i} {names[i]!r} and {named[0][0]} names it "
                f"{named[0][1][i]!r}: its shards number the classes in different orders (shards of "
                f"two versions of the dataset); {download_hint(task, os.path.dirname(path))}")


# ---------------------------------------------------------------- the entry point
def num_classes(task: str) -> int:
    return len(FIXED_CLASSNAMES[task]) if task in FIXED_CLASSNAMES else DATA_NAMED[task]


def _classnames(task: str, split: ParquetImageDataset, root: str) -> list[str]:
    if task in FIXED_CLASSNAMES:  # every shard's names were checked (check_shard_names)
        return list(FIXED_CLASSNAMES[task])
    if split.classlabel_names is None:
        raise DatasetLayoutError(f"{task}: {split.files[0]} carries no ClassLabel names in its schema "
                                 f"metadata, and {task}'s class names come from the data; "
                                 f"{download_hint(task, root)}")
    return list(split.classlabel_names)  # as the dataset spells them (runs/heads.py: what heads use)


def get_parquet_task(name: str, root: str, transform=None, trust_label_order: bool = False) -> TaskData:
    """The task `name` (ours, e.g. `Cars` / `CarsVal`, or FusionBench's `stanford-cars`) read from the
    parquet snapshot under `root`. The test split is FusionBench's; `<Task>Val` evaluates on the
    dataset's validation split where it has one, else on split_train_val's held-out part."""
    name = task_name(name)
    task = base_task(name)
    root = os.path.expanduser(os.fspath(root))
    snapshot = find_snapshot(task, root)
    shards = list_shards(task, snapshot, root)
    src, count = HF_SOURCES[task], num_classes(task)

    def split(split_name: str, required: bool) -> ParquetImageDataset | None:
        if split_name not in shards:
            if not required:
                return None
            raise DatasetLayoutError(f"{task}: no {split_name!r} split in {snapshot} (found "
                                     f"{', '.join(sorted(shards))}); {download_hint(task, root)}")
        return ParquetImageDataset(task, shards[split_name], count, transform, download_hint(task, root))

    val_split = next((s for s in VALIDATION_SPLITS if s in shards and s != src.test_split), None)
    is_val = name != task
    if is_val:  # the validation split, else the held-out part of train (which then must exist)
        train = split("train", required=val_split is None)
        test = split(val_split, required=True) if val_split else None
    else:
        train, test = split("train", required=False), split(src.test_split, required=True)
    check_shard_names(task, [d for d in (test, train) if d is not None], trust_label_order)
    if test is not None and len(test) == 0:
        raise DatasetLayoutError(f"{task}: the {val_split if is_val else src.test_split!r} split "
                                 f"({', '.join(test.files)}) has no rows, so there is nothing to "
                                 f"evaluate on; the download is incomplete: {download_hint(task, root)}")
    named_by = test if test is not None else train
    info = {"root": snapshot, "format": "parquet", "repo": src.repo,
            "test_split": val_split if is_val and val_split else src.test_split,
            "dataset_classnames": named_by.classlabel_names}
    data = TaskData(name if test is not None else task, _classnames(task, named_by, root),
                    get_templates(task), test=named_by, train=train, info=info)
    return data if test is not None else split_train_val(data, name)


def read_fer2013(data_location: str, transform=None) -> TaskData:
    """`Jeneral/fer-2013` as tall_masks loads it (`datasets.load_dataset`), from its parquet snapshot
    under `data_location`: the one task of tall_masks' 20 not in a folder layout (registry.READERS)."""
    return get_parquet_task("FER2013", data_location, transform)
