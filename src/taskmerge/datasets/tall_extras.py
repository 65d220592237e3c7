"""Readers of 11 of the 12 tasks the tall_masks / TSV 14- and 20-task benchmarks add (METHODS.md §5.2).

Each reads the files torchvision's dataset class of that task reads, in the folder tall_masks puts
them under `data_location` (`stl10/`, `OxfordIIITPet/`, `flowers102/`, `PCAM/`, `food101/`,
`RenderedSST2/`, `FashionMNIST/`, `EMNIST/`, `KMNIST/`, and the CIFAR folders directly in it; for the
MNIST-like tasks torchvision's own `<data_location>/<Task>/raw` is accepted too), with sample order
and labels as torchvision gives them, so `<Task>Val` (splits.split_train_val: random_split of the
training set, seed 0, as tall_masks does for every one of these tasks) holds out the same images.
The 12th, FER2013, is Hugging Face's `Jeneral/fer-2013`, which tall_masks reads with
`datasets.load_dataset`: a parquet snapshot under `data_location`, read by parquet.py's
`read_fer2013` (registry.READERS maps the name to it; this module's READERS has the other 11).

Our own readers, not torchvision's classes: those verify the published md5 sums of each file
(STL10, CIFAR, Flowers102) and load whole arrays at construction, and CIFAR's python batches are
pickles, read here through the restricted unpickler (storage/safe_pickle.py, numpy arrays only).
Images are decoded when indexed; the idx, STL10 and PCAM arrays are memory-mapped or read per item.
Class names are torchvision's `.classes` (what tall_masks' heads were built from: CIFAR100 and
Food101 keep their underscores), or the fixed lists in templates.py.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Callable

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from taskmerge.datasets.base import ArrayDataset, TaskData, file_content_record
from taskmerge.datasets.layouts import DATA_README  # noqa: F401 (re-exported)
from taskmerge.datasets.layouts import TALL_EXTRAS_LAYOUTS as LAYOUTS  # noqa: F401 (re-exported)
from taskmerge.datasets.real import (DatasetLayoutError, ImageFileDataset, LazyDataset,  # noqa: F401
                                     _load_mat, _read_text, layout_error, list_images, read_idx)
from taskmerge.datasets.templates import CLASSNAMES, DATA_NAMED_COUNTS, get_templates, oxford_pet_classname
from taskmerge.storage.safe_pickle import CheckpointError, load_numpy_pickle


def _dir(task: str, data_location: str, *parts: str) -> str:
    path = os.path.join(data_location, *parts)
    if not os.path.isdir(path):
        raise layout_error(task, data_location, path, "folder not found")
    return path


def _file(task: str, data_location: str, path: str) -> str:
    if not os.path.isfile(path):
        raise layout_error(task, data_location, path, "file not found")
    return path


def _check_labels(task: str, data_location: str, path: str, labels: np.ndarray, count: int) -> None:
    bad = labels[(labels < 0) | (labels >= count)]
    if bad.size:
        raise layout_error(task, data_location, path,
                           f"label {int(bad[0])} (and {bad.size - 1} more) outside 0..{count - 1}; "
                           f"the file is corrupt or of another dataset")


def _task(task: str, classnames: list[str], train: Dataset, test: Dataset, root: str) -> TaskData:
    return TaskData(task, list(classnames), get_templates(task), test=test, train=train,
                    info={"root": root, "test_split": "test"})


def _check_count(task: str, data_location: str, path: str, classnames: list[str]) -> list[str]:
    if len(classnames) != DATA_NAMED_COUNTS[task]:
        raise layout_error(task, data_location, path,
                           f"{len(classnames)} classes, {task} has {DATA_NAMED_COUNTS[task]}; a "
                           f"missing class would shift the labels against the head")
    return classnames


# ---------------------------------------------------------------- CIFAR10 / CIFAR100 (pickles)
def _unpickle(task: str, data_location: str, path: str) -> dict:
    _file(task, data_location, path)
    try:
        with open(path, "rb") as f:
            obj = load_numpy_pickle(f, path, encoding="latin1")  # Python 2 pickles, as torchvision
    except CheckpointError as e:
        raise layout_error(task, data_location, path, f"cannot read this CIFAR batch ({e})") from None
    if not isinstance(obj, dict):
        raise layout_error(task, data_location, path, f"holds a {type(obj).__name__}, expected a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_split(task: str, data_location: str, root: str, files: list[str], label_key: str,
                 count: int, transform) -> ArrayDataset:
    images, labels = [], []
    for name in files:
        path = os.path.join(root, name)
        batch = _unpickle(task, data_location, path)
        data, y = batch.get("data"), batch.get(label_key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
                or data.shape[1] != 3072 or y is None or len(y) != len(data):
            raise layout_error(task, data_location, path,
                               f"needs 'data' (N × 3072 uint8) and '{label_key}' (N labels)")
        y = np.asarray(y, dtype=np.int64)
        _check_labels(task, data_location, path, y, count)
        images.append(data)
        labels.append(y)
    # (N, 3072) channel-planar rows → (N, 32, 32, 3), as torchvision's CIFAR10 does
    data = np.vstack(images).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return ArrayDataset(np.ascontiguousarray(data), np.concatenate(labels), transform)


def _read_cifar(task: str, folder: str, train_files: list[str], test_file: str, meta_file: str,
                names_key: str, label_key: str, data_location: str, transform) -> TaskData:
    root = _dir(task, data_location, folder)
    meta_path = os.path.join(root, meta_file)
    names = _unpickle(task, data_location, meta_path).get(names_key)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise layout_error(task, data_location, meta_path, f"needs a list of names '{names_key}'")
    if task == "CIFAR10" and names != CLASSNAMES[task]:
        raise layout_error(task, data_location, meta_path,
                           f"class names {names} are not CIFAR-10's {CLASSNAMES[task]}")
    if task == "CIFAR100":
        _check_count(task, data_location, meta_path, names)
    split = functools.partial(_cifar_split, task, data_location, root, label_key=label_key,
                              count=len(names), transform=transform)
    return _task(task, names, LazyDataset(lambda: split(train_files)), LazyDataset(lambda: split([test_file])),
                 root)


def read_cifar10(data_location: str, transform=None) -> TaskData:
    return _read_cifar("CIFAR10", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                       "test_batch", "batches.meta", "label_names", "labels", data_location, transform)


def read_cifar100(data_location: str, transform=None) -> TaskData:
    return _read_cifar("CIFAR100", "cifar-100-python", ["train"], "test", "meta", "fine_label_names",
                       "fine_labels", data_location, transform)


# ---------------------------------------------------------------- STL10 (raw binary)
def _stl10_split(data_location: str, root: str, split: str, transform) -> ArrayDataset:
    task, side = "STL10", 96
    x_path = _file(task, data_location, os.path.join(root, f"{split}_X.bin"))
    y_path = _file(task, data_location, os.path.join(root, f"{split}_y.bin"))
    labels = np.fromfile(y_path, dtype=np.uint8).astype(np.int64) - 1  # the files count from 1
    size = os.path.getsize(x_path)
    if size != len(labels) * 3 * side * side:
        raise layout_error(task, data_location, x_path,
                           f"{size} bytes for {len(labels)} labels of {y_path}; expected "
                           f"{len(labels)} × 3 × 96 × 96")
    _check_labels(task, data_location, y_path, labels, len(CLASSNAMES[task]))
    raw = np.memmap(x_path, dtype=np.uint8, mode="r", shape=(len(labels), 3, side, side))
    # the binary is column-major per channel: torchvision transposes (W, H) and moves channels last
    return ArrayDataset(raw.transpose(0, 3, 2, 1), labels, transform)


def read_stl10(data_location: str, transform=None) -> TaskData:
    root = _dir("STL10", data_location, "stl10", "stl10_binary")
    splits = {s: _stl10_split(data_location, root, s, transform) for s in ("train", "test")}
    return _task("STL10", CLASSNAMES["STL10"], splits["train"], splits["test"], root)


# ---------------------------------------------------------------- MNIST-like idx files
def _idx_task(task: str, data_location: str, transform, stems: dict[str, tuple[str, str]]) -> TaskData:
    roots = [os.path.join(data_location, task, task, "raw"), os.path.join(data_location, task, "raw")]
    raw = next((r for r in roots if os.path.isdir(r)), None)
    if raw is None:
        raise layout_error(task, data_location, " or ".join(roots), "folder not found")
    count = len(CLASSNAMES[task])
    splits = {}
    for split, (images_stem, labels_stem) in stems.items():
        arrays = []
        for stem in (images_stem, labels_stem):
            path = os.path.join(raw, stem)
            if not os.path.isfile(path) and os.path.isfile(path + ".gz"):
                path += ".gz"
            _file(task, data_location, path)
            try:
                arrays.append((path, read_idx(path)))
            except ValueError as e:
                raise layout_error(task, data_location, path, f"malformed idx file ({e})") from None
        (_, images), (labels_path, labels) = arrays
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise layout_error(task, data_location, raw,
                               f"{split}: images {images.shape} and labels {labels.shape} do not match")
        labels = np.asarray(labels, dtype=np.int64)
        _check_labels(task, data_location, labels_path, labels, count)
        splits[split] = ArrayDataset(images, labels, transform)
    return _task(task, CLASSNAMES[task], splits["train"], splits["test"], raw)


_MNIST_STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_fashion_mnist(data_location: str, transform=None) -> TaskData:
    return _idx_task("FashionMNIST", data_location, transform, _MNIST_STEMS)


def read_kmnist(data_location: str, transform=None) -> TaskData:
    return _idx_task("KMNIST", data_location, transform, _MNIST_STEMS)


def read_emnist(data_location: str, transform=None) -> TaskData:
    """EMNIST's "digits" split; its images stay transposed as torchvision returns them (tall_masks'
    experts were fine-tuned on them that way)."""
    return _idx_task("EMNIST", data_location, transform,
                     {s: (f"emnist-digits-{s}-images-idx3-ubyte", f"emnist-digits-{s}-labels-idx1-ubyte")
                      for s in ("train", "test")})


# ---------------------------------------------------------------- image-file tasks
def read_oxford_pets(data_location: str, transform=None) -> TaskData:
    task = "OxfordIIITPet"
    root = _dir(task, data_location, "OxfordIIITPet", "oxford-iiit-pet")
    images = _dir(task, data_location, "OxfordIIITPet", "oxford-iiit-pet", "images")
    splits, names = {}, {}
    for split, listed in (("train", "trainval"), ("test", "test")):
        path = _file(task, data_location, os.path.join(root, "annotations", f"{listed}.txt"))
        samples = []
        for n, line in enumerate(_read_text(task, data_location, path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                image_id, label = line.split()[:2]
                label = int(label) - 1
            except ValueError:
                raise layout_error(task, data_location, path,
                                   f"line {n} is not '<image id> <class id> ...': {line!r}") from None
            if not 0 <= label < DATA_NAMED_COUNTS[task]:
                raise layout_error(task, data_location, path, f"line {n}: class id {label + 1} "
                                   f"outside 1..{DATA_NAMED_COUNTS[task]}")
            if split == "train":
                names.setdefault(label, oxford_pet_classname(image_id))
            samples.append((os.path.join(images, f"{image_id}.jpg"), label))
        splits[split] = ImageFileDataset(task, samples, transform)
    # torchvision names the classes from the training annotations, in class-id order
    if sorted(names) != list(range(DATA_NAMED_COUNTS[task])):
        raise layout_error(task, data_location, os.path.join(root, "annotations", "trainval.txt"),
                           f"names {len(names)} of the {DATA_NAMED_COUNTS[task]} breeds; every class "
                           f"id must appear in the training annotations")
    return _task(task, [names[i] for i in sorted(names)], splits["train"], splits["test"], root)


def read_flowers102(data_location: str, transform=None) -> TaskData:
    task = "Flowers102"
    root = _dir(task, data_location, "flowers102", "flowers-102")
    setid = _load_mat(task, data_location, _file(task, data_location, os.path.join(root, "setid.mat")),
                      "Flowers102's setid.mat")
    labels_path = _file(task, data_location, os.path.join(root, "imagelabels.mat"))
    labels = _load_mat(task, data_location, labels_path, "Flowers102's imagelabels.mat").get("labels")
    if labels is None or any(k not in setid for k in ("trnid", "tstid")):
        raise layout_error(task, data_location, root, "needs imagelabels.mat['labels'] and "
                           "setid.mat['trnid', 'tstid']")
    labels = np.atleast_1d(labels).astype(np.int64) - 1  # 1-based, per image id 1..N
    _check_labels(task, data_location, labels_path, labels, len(CLASSNAMES[task]))
    splits = {}
    for split, key in (("train", "trnid"), ("test", "tstid")):
        ids = np.atleast_1d(setid[key]).astype(np.int64).tolist()
        bad = [i for i in ids if not 1 <= i <= len(labels)]
        if bad:
            raise layout_error(task, data_location, os.path.join(root, "setid.mat"),
                               f"image id {bad[0]} of '{key}' has no label in imagelabels.mat")
        splits[split] = ImageFileDataset(
            task, [(os.path.join(root, "jpg", f"image_{i:05d}.jpg"), int(labels[i - 1])) for i in ids],
            transform)
    return _task(task, CLASSNAMES[task], splits["train"], splits["test"], root)


def read_food101(data_location: str, transform=None) -> TaskData:
    task = "Food101"
    root = _dir(task, data_location, "food101", "food-101")
    splits, classes = {}, None
    for split in ("train", "test"):
        path = _file(task, data_location, os.path.join(root, "meta", f"{split}.json"))
        try:
            meta = json.loads(_read_text(task, data_location, path))
        except ValueError as e:
            raise layout_error(task, data_location, path, f"not JSON ({e})") from None
        if not isinstance(meta, dict) or not all(isinstance(v, list) for v in meta.values()):
            raise layout_error(task, data_location, path, "expected {class: [\"class/id\", ...]}")
        split_classes = _check_count(task, data_location, path, sorted(meta))
        if classes is not None and split_classes != classes:
            raise layout_error(task, data_location, path, "classes differ from meta/train.json's")
        classes = split_classes
        index = {c: i for i, c in enumerate(classes)}
        # torchvision's order: the JSON's classes as listed, each one's images as listed
        splits[split] = ImageFileDataset(task, [(os.path.join(root, "images", *f"{rel}.jpg".split("/")), index[c])
                                                for c, rels in meta.items() for rel in rels], transform)
    return _task(task, classes, splits["train"], splits["test"], root)


def read_rendered_sst2(data_location: str, transform=None) -> TaskData:
    task = "RenderedSST2"
    root = _dir(task, data_location, "RenderedSST2", "rendered-sst2")
    classes = CLASSNAMES[task]
    index = {c: i for i, c in enumerate(classes)}
    png = lambda path: path.lower().endswith(".png")  # noqa: E731 (torchvision reads only .png)
    splits = {s: ImageFileDataset(task, list_images(task, data_location, _dir(task, data_location, root, s),
                                                    index, is_valid=png), transform)
              for s in ("train", "test")}
    return _task(task, classes, splits["train"], splits["test"], root)


# ---------------------------------------------------------------- PCAM (HDF5)
class PCAMDataset(Dataset):
    """PCAM's HDF5 pair (x: N×96×96×3 uint8, y: N×1×1×1); each image is read when indexed. h5py is
    needed only here, imported on first use (`pip install h5py`)."""

    def __init__(self, data_location: str, x_path: str, y_path: str, transform: Callable | None):
        h5py = _h5py(data_location, x_path)
        self.x_path, self.transform, self._file = x_path, transform, None
        try:
            with h5py.File(y_path, "r") as f:
                labels = np.asarray(f["y"]).reshape(-1).astype(np.int64)
            with h5py.File(x_path, "r") as f:
                shape, dtype = f["x"].shape, f["x"].dtype
        except (OSError, KeyError) as e:
            raise layout_error("PCAM", data_location, f"{x_path}, {y_path}",
                               f"cannot read the 'x' / 'y' datasets ({e})") from None
        if len(shape) != 4 or shape[0] != len(labels) or shape[3] != 3:
            raise layout_error("PCAM", data_location, x_path,
                               f"'x' has shape {shape}, expected ({len(labels)}, 96, 96, 3)")
        if dtype != np.uint8:
            # torchvision's PCAM (which tall_masks reads) hands the array to PIL's fromarray, which
            # has no RGB mode for other types: a float copy is not PCAM's file, and scaling it back
            # to 0..255 would be a guess at how it was made.
            raise layout_error("PCAM", data_location, x_path,
                               f"'x' is stored as {dtype}; PCAM's files hold uint8 pixels 0..255, as "
                               f"torchvision's PCAM reads them: use the original "
                               f"camelyonpatch_level_2_split_*_x.h5 (or its parquet copy, "
                               f"data_format='parquet')")
        _check_labels("PCAM", data_location, y_path, labels, len(CLASSNAMES["PCAM"]))
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def update_content_hash(self, h) -> None:
        h.update(f"{file_content_record(self.x_path)}\n".encode())
        h.update(self.labels.tobytes())

    def __getstate__(self):  # DataLoader workers open their own handle
        return dict(self.__dict__, _file=None)

    def __getitem__(self, i: int):
        if self._file is None:
            import h5py
            self._file = h5py.File(self.x_path, "r")
        img = Image.fromarray(np.asarray(self._file["x"][i])).convert("RGB")
        if self.transform is not None:
            img = self.transform(img)
        return img, int(self.labels[i])


def _h5py(data_location: str, path: str):
    try:
        import h5py
    except ImportError:
        raise layout_error("PCAM", data_location, path, "reading PCAM's .h5 files needs h5py "
                           "(pip install h5py), or use its parquet copy (data_format='parquet')") from None
    return h5py


def read_pcam(data_location: str, transform=None) -> TaskData:
    task = "PCAM"
    root = _dir(task, data_location, "PCAM", "pcam")
    splits = {}
    for split in ("train", "test"):
        stem = os.path.join(root, f"camelyonpatch_level_2_split_{split}")
        x, y = (_file(task, data_location, f"{stem}_{v}.h5") for v in ("x", "y"))
        splits[split] = LazyDataset(functools.partial(PCAMDataset, data_location, x, y, transform))
    return _task(task, CLASSNAMES[task], splits["train"], splits["test"], root)


READERS: dict[str, Callable[..., TaskData]] = {
    "STL10": read_stl10,
    "OxfordIIITPet": read_oxford_pets,
    "Flowers102": read_flowers102,
    "CIFAR100": read_cifar100,
    "PCAM": read_pcam,
    "CIFAR10": read_cifar10,
    "Food101": read_food101,
    "FashionMNIST": read_fashion_mnist,
    "RenderedSST2": read_rendered_sst2,
    "EMNIST": read_emnist,
    "KMNIST": read_kmnist,
}
