"""Tiny copies of the 12 extra tasks' folder layouts (torchvision's files, where tall_masks puts
them), and one call that writes all 20 tasks. As in test_datasets_real, an image's red channel is
5·label mod 255, so reading it back checks that images and labels stay paired."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import scipy.io
from test_datasets_parquet import write_shard, write_split
from test_datasets_real import (make_cars, make_dtd, make_eurosat, make_gtsrb, make_mnist, make_resisc45,
                                make_sun397, make_svhn, write_idx)
from PIL import Image

from taskmerge.datasets import templates
from taskmerge.datasets.fusionbench_classnames import CLASSNAMES as FUSIONBENCH_CLASSNAMES
from taskmerge.datasets.parquet import HF_SOURCES

N_TRAIN, N_TEST = 20, 4   # 20: a 10 % Val split of 2


def labels_of(n: int, count: int, start: int = 0) -> np.ndarray:
    """Labels 0 and count-1 first, then a spread, so both ends of the class range are read."""
    return np.array([0, count - 1] + [(3 * i + start) % count for i in range(n - 2)], dtype=np.int64)


def red_level(label) -> int:
    return 5 * int(label) % 255


def write_image(path: str, label: int, k: int = 0, size: int = 8) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (size, size), (red_level(label), k % 250, 77)).save(path)


def make_cifar(data: str, task: str = "CIFAR10") -> dict[str, np.ndarray]:
    """Python-2-style batches (protocol 2), planar uint8 rows: the red plane carries the label."""
    ten = task == "CIFAR10"
    root = os.path.join(data, "cifar-10-batches-py" if ten else "cifar-100-python")
    os.makedirs(root, exist_ok=True)
    count = 10 if ten else 100
    names = templates.CLASSNAMES["CIFAR10"] if ten else [f"class_{i:03d}" for i in range(count)]
    meta = {"label_names": names} if ten else {"fine_label_names": names, "coarse_label_names": ["x"]}
    with open(os.path.join(root, "batches.meta" if ten else "meta"), "wb") as f:
        pickle.dump(meta, f, protocol=2)
    files = ([f"data_batch_{i}" for i in range(1, 6)], "test_batch") if ten else (["train"], "test")
    out = {}
    for split, names_, n in (("train", files[0], N_TRAIN), ("test", [files[1]], N_TEST)):
        labels = labels_of(n, count, start=1 if split == "test" else 0)
        out[split] = labels
        for part, idx in zip(names_, np.array_split(np.arange(n), len(names_))):
            rows = np.zeros((len(idx), 3, 32, 32), dtype=np.uint8)
            rows[:, 0] = np.array([red_level(y) for y in labels[idx]], dtype=np.uint8)[:, None, None]
            rows[:, 1] = (idx % 250)[:, None, None]
            key = "labels" if ten else "fine_labels"
            with open(os.path.join(root, part), "wb") as f:
                pickle.dump({"data": rows.reshape(len(idx), 3072), key: labels[idx].tolist(),
                             "batch_label": part}, f, protocol=2)
    return out


def make_stl10(data: str) -> dict[str, np.ndarray]:
    root = os.path.join(data, "stl10", "stl10_binary")
    os.makedirs(root, exist_ok=True)
    out = {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        labels = labels_of(n, 10)
        x = np.zeros((n, 3, 96, 96), dtype=np.uint8)
        x[:, 0] = np.array([red_level(y) for y in labels], dtype=np.uint8)[:, None, None]
        x[:, 1, :, :48] = 200  # the left half of the stored planes: the image's top half after the flip
        x.tofile(os.path.join(root, f"{split}_X.bin"))
        (labels + 1).astype(np.uint8).tofile(os.path.join(root, f"{split}_y.bin"))
        out[split] = labels
    return out


PET_BREEDS = ["Abyssinian", "american_bulldog", "american_pit_bull_terrier"] + [
    f"breed_{i:02d}" for i in range(34)]


def make_oxford_pets(data: str) -> dict[str, list[int]]:
    root = os.path.join(data, "OxfordIIITPet", "oxford-iiit-pet")
    out = {}
    for split, listed, n in (("train", "trainval", 37 + 3), ("test", "test", N_TEST)):
        labels = list(range(37)) + [0, 36, 2] if split == "train" else labels_of(n, 37).tolist()
        lines = []
        for k, y in enumerate(labels):
            image_id = f"{PET_BREEDS[y]}_{k + (100 if split == 'test' else 0)}"
            write_image(os.path.join(root, "images", f"{image_id}.jpg"), y, k)
            lines.append(f"{image_id} {y + 1} {1 + y % 2} {y + 1}")
        os.makedirs(os.path.join(root, "annotations"), exist_ok=True)
        with open(os.path.join(root, "annotations", f"{listed}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
        out[split] = labels
    return out


def make_flowers102(data: str) -> dict[str, list[int]]:
    root = os.path.join(data, "flowers102", "flowers-102")
    n = N_TRAIN + N_TEST
    labels = labels_of(n, 102)
    for i, y in enumerate(labels, 1):
        write_image(os.path.join(root, "jpg", f"image_{i:05d}.jpg"), y, i)
    scipy.io.savemat(os.path.join(root, "imagelabels.mat"), {"labels": (labels + 1).reshape(1, -1)})
    ids = np.arange(1, n + 1)
    train, test = ids[::-1][:N_TRAIN], ids[::-1][N_TRAIN:]  # not in id order: the set order is kept
    scipy.io.savemat(os.path.join(root, "setid.mat"), {"trnid": train.reshape(1, -1), "valid": train[:1],
                                                       "tstid": test.reshape(1, -1)})
    return {"train": labels[train - 1].tolist(), "test": labels[test - 1].tolist()}


def make_pcam(data: str) -> dict[str, np.ndarray]:
    import h5py
    root = os.path.join(data, "PCAM", "pcam")
    os.makedirs(root, exist_ok=True)
    out = {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        labels = labels_of(n, 2)
        x = np.zeros((n, 8, 8, 3), dtype=np.uint8)
        x[..., 0] = np.array([red_level(y) for y in labels], dtype=np.uint8)[:, None, None]
        stem = os.path.join(root, f"camelyonpatch_level_2_split_{split}")
        with h5py.File(f"{stem}_x.h5", "w") as f:
            f["x"] = x
        with h5py.File(f"{stem}_y.h5", "w") as f:
            f["y"] = labels.astype(np.uint8).reshape(n, 1, 1, 1)
        out[split] = labels
    return out


def make_fer2013(data: str) -> dict[str, list[int]]:
    """`Jeneral/fer-2013` as `hf download --local-dir <data>/fer-2013` writes it (img_bytes, labels)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq
    folder = os.path.join(data, HF_SOURCES["FER2013"].repo.split("/")[1], "data")
    os.makedirs(folder, exist_ok=True)
    out = {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        labels = labels_of(n, 7).tolist()
        cells = []
        for k, y in enumerate(labels):
            buf = io.BytesIO()
            Image.new("L", (8, 8), red_level(y)).save(buf, format="PNG")  # FER2013 is grayscale
            cells.append(buf.getvalue())
        pq.write_table(pa.table({"img_bytes": pa.array(cells, pa.binary()), "labels": pa.array(labels)}),
                       os.path.join(folder, f"{split}-00000-of-00001.parquet"))
        out[split] = labels
    return out


def make_food101(data: str) -> dict[str, list[int]]:
    root = os.path.join(data, "food101", "food-101")
    classes = ["apple_pie", "baby_back_ribs"] + [f"dish_{i:03d}" for i in range(99)]
    out = {}
    for split in ("train", "test"):
        # one image per class, listed in reverse class order (torchvision keeps the JSON's order)
        meta = {c: [f"{c}/{split}{k}"] for k, c in enumerate(reversed(classes))}
        for c, rels in meta.items():
            for rel in rels:
                write_image(os.path.join(root, "images", f"{rel}.jpg"), classes.index(c))
        os.makedirs(os.path.join(root, "meta"), exist_ok=True)
        with open(os.path.join(root, "meta", f"{split}.json"), "w") as f:
            json.dump(meta, f)
        out[split] = [classes.index(c) for c in meta]
    return out


def make_rendered_sst2(data: str) -> dict[str, list[int]]:
    root = os.path.join(data, "RenderedSST2", "rendered-sst2")
    out = {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST), ("valid", 2)):
        labels = sorted(labels_of(n, 2).tolist())  # ImageFolder order: negative/ then positive/
        for k, y in enumerate(labels):
            write_image(os.path.join(root, split, ["negative", "positive"][y], f"{k:05d}.png"), y, k)
        out[split] = labels
    return out


def make_idx_task(data: str, task: str, tall_masks_root: bool = True, compress: bool = False):
    raw = os.path.join(data, task, task, "raw") if tall_masks_root else os.path.join(data, task, "raw")
    out = {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        if task == "EMNIST":
            stems = (f"emnist-digits-{split}-images-idx3-ubyte", f"emnist-digits-{split}-labels-idx1-ubyte")
        else:
            prefix = "train" if split == "train" else "t10k"
            stems = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
        labels = labels_of(n, 10)
        images = np.broadcast_to(np.array([red_level(y) for y in labels], np.uint8)[:, None, None], (n, 8, 8))
        write_idx(os.path.join(raw, stems[0]), images, compress)
        write_idx(os.path.join(raw, stems[1]), labels, compress)
        out[split] = labels
    return out


EXTRA_BUILDERS = {
    "STL10": make_stl10, "OxfordIIITPet": make_oxford_pets, "Flowers102": make_flowers102,
    "CIFAR100": lambda d: make_cifar(d, "CIFAR100"), "PCAM": make_pcam, "FER2013": make_fer2013,
    "CIFAR10": make_cifar, "Food101": make_food101,
    "FashionMNIST": lambda d: make_idx_task(d, "FashionMNIST"), "RenderedSST2": make_rendered_sst2,
    "EMNIST": lambda d: make_idx_task(d, "EMNIST"), "KMNIST": lambda d: make_idx_task(d, "KMNIST"),
}

CORE_BUILDERS = {
    "Cars": make_cars, "DTD": lambda d: make_dtd(d, {"banded": 2}, {"banded": 1}),
    "EuroSAT": make_eurosat, "GTSRB": make_gtsrb, "MNIST": make_mnist, "RESISC45": make_resisc45,
    "SVHN": make_svhn, "SUN397": make_sun397,
}


def make_folders(data: str, tasks) -> None:
    """Every task of `tasks` in its folder layout under `data`."""
    for task in tasks:
        (CORE_BUILDERS.get(task) or EXTRA_BUILDERS[task])(data)


def make_parquet(data: str, tasks, n: int = 6) -> None:
    """Every task of `tasks` as its hub parquet snapshot under `data` (`hf download --local-dir`)."""
    from test_datasets_parquet import write_task
    for task in tasks:
        names = None
        if task in templates.DATA_NAMED_COUNTS:
            # the hub's names are the class names FusionBench's lists spell (an order that checks)
            names = [n.replace(" ", "_") for n in FUSIONBENCH_CLASSNAMES[task]]
        write_task(data, task, n=n, names=names)


__all__ = ["EXTRA_BUILDERS", "make_folders", "make_parquet", "labels_of", "write_shard", "write_split"]
