"""Readers of the 8 real tasks' folder layouts under `data_location` (METHODS.md §5.1).

Both families' layouts are accepted: EnnengYang's pre-processed copy (`sun397/test`, `dtd/test`,
Cars test labels in `devkit/`) and task_vectors' recipe (`sun397/val`, `dtd/val`, Cars test labels
next to `devkit/`). Sample order is the originals' (torchvision ImageFolder order: sorted class
folders, then a sorted walk of each), so `<Task>Val` splits pick the same images as theirs.

Construction only lists files (and memory-maps MNIST); images are decoded in `__getitem__`, and
SVHN's `.mat` arrays are read on first use. Nothing downloads. A missing or malformed layout raises
one `DatasetLayoutError` naming the task, the path looked for and the layout expected.
"""
from __future__ import annotations

import csv
import functools
import gzip
import io
import os
import re
import zlib
from typing import Callable

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from taskmerge.datasets.errors import DatasetLayoutError  # noqa: F401 (re-exported)
from taskmerge.datasets.base import ArrayDataset, TaskData, file_stat_record, hash_dataset_content
from taskmerge.datasets.layouts import LAYOUTS as ALL_LAYOUTS
from taskmerge.datasets.layouts import REAL_LAYOUTS as LAYOUTS  # noqa: F401 (re-exported)
from taskmerge.datasets.layouts import DATA_README
from taskmerge.datasets.templates import (CARS_CLASS_COUNT, CLASSNAMES, DTD_FOLDERS, EUROSAT_FOLDERS,
                                          GTSRB_FOLDERS, RESISC45_FOLDERS, SUN397_CLASS_COUNT,
                                          cars_classname, dtd_classname, eurosat_classname,
                                          get_templates, sun397_classname)

# torchvision's ImageFolder extensions, so a folder holds exactly the images the originals saw.
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

# The class folders of each folder task: the task's list, or only their number where no list is
# fixed. Labels are positions in the sorted folder list, so one missing folder would shift every
# later label against the head's classes.
CLASS_FOLDERS: dict[str, list[str] | int] = {
    "SUN397": SUN397_CLASS_COUNT, "DTD": DTD_FOLDERS, "EuroSAT": EUROSAT_FOLDERS,
    "RESISC45": RESISC45_FOLDERS, "GTSRB": GTSRB_FOLDERS,
}



def layout_error(task: str, data_location: str, path: str, problem: str) -> DatasetLayoutError:
    return DatasetLayoutError(
        f"{task}: {problem}\n"
        f"  looked at: {path}\n"
        f"Expected under data_location ({data_location}):\n{ALL_LAYOUTS[task]}\n"
        f"See {DATA_README} for how to prepare the datasets.")


# ---------------------------------------------------------------- datasets
class ImageFileDataset(Dataset):
    """Image files with labels; each file is opened and converted to RGB only when indexed."""

    def __init__(self, task: str, samples: list[tuple[str, int]], transform: Callable | None):
        self.task = task
        self.samples = samples
        self.labels = [label for _, label in samples]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def update_content_hash(self, h) -> None:
        for path, label in self.samples:
            try:
                record = file_stat_record(path)
            except OSError as e:
                raise DatasetLayoutError(f"{self.task}: cannot read image {path} ({e}); replace the "
                                         f"file or remove it") from e
            h.update(f"{record}:{label}\n".encode())

    def __getitem__(self, i: int):
        path, label = self.samples[i]
        try:
            with open(path, "rb") as f:
                img = Image.open(f).convert("RGB")
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            # missing, truncated, not an image PIL can decode, or too large to decode safely
            raise DatasetLayoutError(f"{self.task}: cannot read image {path} ({type(e).__name__}: "
                                     f"{e}); replace the file or remove it") from e
        if self.transform is not None:
            img = self.transform(img)
        return img, label


class LazyDataset(Dataset):
    """A dataset built by `load()` on first use: SVHN's training arrays take ~250 MB, and an
    evaluation that only needs the test split should not pay for them."""

    def __init__(self, load: Callable[[], Dataset]):
        self._load = load
        self._dataset: Dataset | None = None

    @property
    def dataset(self) -> Dataset:
        if self._dataset is None:
            self._dataset = self._load()
        return self._dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def update_content_hash(self, h) -> None:
        hash_dataset_content(h, self.dataset)

    def __getitem__(self, i: int):
        return self.dataset[i]


# ---------------------------------------------------------------- folder listing (ImageFolder order)
def _require_dir(task: str, data_location: str, path: str) -> str:
    if not os.path.isdir(path):
        raise layout_error(task, data_location, path, "folder not found")
    return path


def _require_file(task: str, data_location: str, path: str) -> str:
    if not os.path.isfile(path):
        raise layout_error(task, data_location, path, "file not found")
    return path


def class_folders(task: str, data_location: str, root: str) -> list[str]:
    """Sorted sub-folder names of `root`, as torchvision's `find_classes` returns them; checked
    against the task's known classes (`CLASS_FOLDERS`) where it has them."""
    _require_dir(task, data_location, root)
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise layout_error(task, data_location, root, "no class folders")
    expected = CLASS_FOLDERS.get(task)
    if isinstance(expected, int) and len(classes) != expected:
        raise layout_error(task, data_location, root,
                           f"{len(classes)} class folders, expected {task}'s {expected}; a missing "
                           f"or extra folder would shift the labels against the head")
    if isinstance(expected, list) and classes != expected:
        missing = [c for c in expected if c not in classes]
        extra = [c for c in classes if c not in expected]
        raise layout_error(task, data_location, root,
                           f"class folders differ from {task}'s {len(expected)} classes "
                           f"(missing {missing[:5]}, unexpected {extra[:5]}); a missing or extra "
                           f"folder would shift the labels against the head")
    return classes


def _walk(task: str, data_location: str, top: str, seen: dict) -> list[tuple[str, list[str]]]:
    """(folder, file names) of `top` and every folder below it, following links like torchvision's
    `os.walk(followlinks=True)`, sorted like its `make_dataset`. A folder reached twice (a symlink
    loop, or a second link to a folder already read) is refused: its images would be read again."""
    walked = []
    for folder, _, fnames in os.walk(top, followlinks=True):
        st = os.stat(folder)
        first = seen.setdefault((st.st_dev, st.st_ino), folder)
        if first != folder:
            raise layout_error(task, data_location, folder,
                               f"the same folder as {first} (a symlink loop or a second symlink "
                               f"to it); its images would be counted twice. Remove the link")
        walked.append((folder, fnames))
    return sorted(walked)


def list_images(task: str, data_location: str, root: str, class_to_idx: dict[str, int],
                is_valid: Callable[[str], bool] | None = None,
                require_images: bool = True) -> list[tuple[str, int]]:
    """(path, label) for every image of every class folder of `root`, in ImageFolder's order.

    Class folders of `root` are labelled by `class_to_idx` (the training split's classes, so a test
    folder can never shift labels); folders that differ from its classes, and (`require_images`)
    a class folder without images, as torchvision refuses it, are layout errors."""
    is_valid = is_valid or (lambda path: path.lower().endswith(IMG_EXTENSIONS))
    samples, seen = [], {}
    _require_dir(task, data_location, root)
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if classes != sorted(class_to_idx):
        missing = [c for c in class_to_idx if c not in classes]
        extra = [c for c in classes if c not in class_to_idx]
        raise layout_error(task, data_location, root,
                           f"class folders differ from the training split's {len(class_to_idx)} "
                           f"(missing {missing[:5]}, unexpected {extra[:5]})")
    for cls in classes:
        found = len(samples)
        for folder, fnames in _walk(task, data_location, os.path.join(root, cls), seen):
            for fname in sorted(fnames):
                path = os.path.join(folder, fname)
                if is_valid(path):
                    samples.append((path, class_to_idx[cls]))
        if require_images and len(samples) == found:
            raise layout_error(task, data_location, os.path.join(root, cls),
                               "class folder has no images")
    if not samples:
        raise layout_error(task, data_location, root, "no images")
    return samples


def _test_folder(task: str, data_location: str, root: str) -> str:
    """EnnengYang's copies name the evaluated split `test`, task_vectors' recipe `val`."""
    for split in ("test", "val"):
        if os.path.isdir(os.path.join(root, split)):
            return split
    raise layout_error(task, data_location, os.path.join(root, "test"),
                       "folder not found (nor its alternative name 'val')")


def _image_folder_task(task: str, folder: str, data_location: str, transform,
                       classname: Callable[[str], str], test_split: str | None = None) -> TaskData:
    root = os.path.join(data_location, folder)
    classes = class_folders(task, data_location, os.path.join(root, "train"))
    class_to_idx = {c: i for i, c in enumerate(classes)}
    classnames = []
    for c in classes:
        try:
            classnames.append(classname(c))
        except KeyError:
            raise layout_error(task, data_location, os.path.join(root, "train", c),
                               "unexpected class folder") from None
    test_split = test_split or _test_folder(task, data_location, root)
    train = list_images(task, data_location, os.path.join(root, "train"), class_to_idx)
    test = list_images(task, data_location, os.path.join(root, test_split), class_to_idx)
    return TaskData(task, classnames, get_templates(task), test=ImageFileDataset(task, test, transform),
                    train=ImageFileDataset(task, train, transform),
                    info={"root": root, "test_split": test_split})


# ---------------------------------------------------------------- the 8 readers
_SUN397_PREFIX = re.compile(r"^[a-z]_.")  # no SUN397 name has "_" as its second letter


def read_sun397(data_location: str, transform=None) -> TaskData:
    """SUN397's class folders carry the first letter of the name as a prefix (`a_abbey`), which the
    originals cut off (`[2:]`); a copy whose folders have no prefix (`abbey`) has the same sorted
    order and its names are read whole: cutting two letters off would name the class `bey`. A copy
    that mixes both is refused."""
    folders = class_folders("SUN397", data_location, os.path.join(data_location, "sun397", "train"))
    prefixed = [f for f in folders if _SUN397_PREFIX.match(f)]
    if prefixed and len(prefixed) != len(folders):
        bare = next(f for f in folders if f not in prefixed)
        raise layout_error("SUN397", data_location, os.path.join(data_location, "sun397", "train", bare),
                           f"{len(prefixed)} class folders carry SUN397's letter prefix (e.g. "
                           f"{prefixed[0]}) and {len(folders) - len(prefixed)} do not (e.g. {bare}); "
                           f"name them all one way")
    classname = sun397_classname if prefixed else (lambda folder: folder.replace("_", " "))
    return _image_folder_task("SUN397", "sun397", data_location, transform, classname)


def read_dtd(data_location: str, transform=None) -> TaskData:
    return _image_folder_task("DTD", "dtd", data_location, transform, dtd_classname)


def read_eurosat(data_location: str, transform=None, test_split: str = "test") -> TaskData:
    """`test_split="val"` gives EuroSATVal: EuroSAT is the one task with a real validation folder."""
    return _image_folder_task("EuroSAT", "EuroSAT_splits", data_location, transform, eurosat_classname,
                              test_split)


def read_resisc45(data_location: str, transform=None) -> TaskData:
    task = "RESISC45"
    root = os.path.join(data_location, "resisc45")
    image_root = os.path.join(root, "NWPU-RESISC45")
    classes = class_folders(task, data_location, image_root)
    if classes != RESISC45_FOLDERS:
        missing = sorted(set(RESISC45_FOLDERS) - set(classes))
        extra = sorted(set(classes) - set(RESISC45_FOLDERS))
        raise layout_error(task, data_location, image_root,
                           f"class folders differ from the 45 RESISC45 classes "
                           f"(missing {missing[:3]}, unexpected {extra[:3]})")
    class_to_idx = {c: i for i, c in enumerate(classes)}

    def split(name: str) -> ImageFileDataset:
        # The split files list bare file names (from "In-domain representation learning for
        # remote sensing"); the originals keep an image iff its file name is listed.
        list_path = _require_file(task, data_location, os.path.join(root, f"resisc45-{name}.txt"))
        listed = {line.strip() for line in _read_text(task, data_location, list_path).splitlines()
                  if line.strip()}
        samples = list_images(task, data_location, image_root, class_to_idx,
                              is_valid=lambda path: os.path.basename(path) in listed,
                              require_images=False)  # the listed files are checked below
        if len(samples) != len(listed):
            found = {os.path.basename(p) for p, _ in samples}
            absent = sorted(listed - found)
            raise layout_error(task, data_location, list_path,
                               f"{len(listed)} files listed but {len(samples)} found under "
                               f"{image_root} (e.g. {absent[:2]} missing)")
        return ImageFileDataset(task, samples, transform)

    return TaskData(task, list(CLASSNAMES[task]), get_templates(task), test=split("test"),
                    train=split("train"), info={"root": root, "test_split": "test"})


def _read_text(task: str, data_location: str, path: str) -> str:
    try:
        with open(path, encoding="utf-8", newline="") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise layout_error(task, data_location, path, f"not a text file ({e})") from None


def _load_mat(task: str, data_location: str, path: str, what: str) -> dict:
    import scipy.io
    try:
        return scipy.io.loadmat(path, squeeze_me=True)
    except Exception as e:  # scipy raises several types for a file that is not a .mat
        raise layout_error(task, data_location, path, f"cannot read as {what} ({e})") from e


def _cars_annotations(data_location: str, mat_path: str, images_dir: str,
                      num_classes: int) -> list[tuple[str, int]]:
    task = "Cars"
    annotations = _load_mat(task, data_location, mat_path, "a Stanford Cars annotation file").get(
        "annotations")
    fields = getattr(getattr(annotations, "dtype", None), "names", None) or ()
    if "fname" not in fields or "class" not in fields:
        raise layout_error(task, data_location, mat_path,
                           "needs a struct array 'annotations' with fields 'fname' and 'class' "
                           "(for the test split: the *_withlabels.mat file)")
    samples = []
    for a in np.atleast_1d(annotations):
        try:
            label = int(a["class"]) - 1  # the .mat labels are 1-based
        except (TypeError, ValueError):
            raise layout_error(task, data_location, mat_path,
                               f"class {a['class']!r} of {a['fname']} is not a number") from None
        if not 0 <= label < num_classes:
            raise layout_error(task, data_location, mat_path,
                               f"class {label + 1} outside 1..{num_classes} (cars_meta.mat)")
        samples.append((os.path.join(images_dir, str(a["fname"])), label))
    return samples


def read_cars(data_location: str, transform=None) -> TaskData:
    task = "Cars"
    root = os.path.join(data_location, "stanford_cars")
    devkit = _require_dir(task, data_location, os.path.join(root, "devkit"))
    meta_path = _require_file(task, data_location, os.path.join(devkit, "cars_meta.mat"))
    meta = _load_mat(task, data_location, meta_path, "cars_meta.mat")
    if "class_names" not in meta:
        raise layout_error(task, data_location, meta_path, "no 'class_names' variable")
    classnames = [cars_classname(str(c)) for c in np.atleast_1d(meta["class_names"]).tolist()]
    if len(classnames) != CARS_CLASS_COUNT:
        raise layout_error(task, data_location, meta_path,
                           f"{len(classnames)} class names, expected {CARS_CLASS_COUNT} (Stanford "
                           f"Cars); labels would not match the head")

    # EnnengYang keeps the labelled test annotations in devkit/, task_vectors next to it.
    candidates = [os.path.join(devkit, "cars_test_annos_withlabels.mat"),
                  os.path.join(root, "cars_test_annos_withlabels.mat")]
    test_annos = next((p for p in candidates if os.path.isfile(p)), None)
    if test_annos is None:
        raise layout_error(task, data_location, " or ".join(candidates), "file not found")
    splits = {}
    for split, annos in (("train", os.path.join(devkit, "cars_train_annos.mat")),
                         ("test", test_annos)):
        images = _require_dir(task, data_location, os.path.join(root, f"cars_{split}"))
        annos = _require_file(task, data_location, annos)
        splits[split] = ImageFileDataset(
            task, _cars_annotations(data_location, annos, images, len(classnames)), transform)
    return TaskData(task, classnames, get_templates(task), test=splits["test"], train=splits["train"],
                    info={"root": root, "test_split": "test", "test_annotations": test_annos})


def read_gtsrb(data_location: str, transform=None) -> TaskData:
    task = "GTSRB"
    root = os.path.join(data_location, "gtsrb")
    train_root = os.path.join(root, "GTSRB", "Training")
    classes = class_folders(task, data_location, train_root)
    classnames = list(CLASSNAMES[task])
    if len(classes) != len(classnames):
        raise layout_error(task, data_location, train_root,
                           f"{len(classes)} class folders, expected {len(classnames)} (00000..00042)")
    train = list_images(task, data_location, train_root, {c: i for i, c in enumerate(classes)},
                        is_valid=lambda path: path.lower().endswith(".ppm"))

    images = _require_dir(task, data_location, os.path.join(root, "GTSRB", "Final_Test", "Images"))
    csv_path = _require_file(task, data_location, os.path.join(root, "GT-final_test.csv"))
    rows = list(csv.DictReader(io.StringIO(_read_text(task, data_location, csv_path)),
                               delimiter=";", skipinitialspace=True))
    try:
        test = [(os.path.join(images, row["Filename"]), int(row["ClassId"])) for row in rows]
    except (KeyError, TypeError, ValueError) as e:
        raise layout_error(task, data_location, csv_path,
                           f"needs ';'-separated columns Filename and ClassId ({e!r})") from None
    if not test:
        raise layout_error(task, data_location, csv_path, "no rows")
    bad = next(((path, label) for path, label in test if not 0 <= label < len(classnames)), None)
    if bad is not None:
        raise layout_error(task, data_location, csv_path,
                           f"ClassId {bad[1]} of {os.path.basename(bad[0])} is outside "
                           f"0..{len(classnames) - 1}; the file is corrupt or of another dataset")
    return TaskData(task, classnames, get_templates(task), test=ImageFileDataset(task, test, transform),
                    train=ImageFileDataset(task, train, transform),
                    info={"root": root, "test_split": "test"})


def _load_svhn(data_location: str, path: str, transform) -> ArrayDataset:
    task = "SVHN"
    mat = _load_mat(task, data_location, path, "an SVHN .mat file")
    x, y = mat.get("X"), mat.get("y")
    if x is None or y is None or x.ndim != 4 or x.shape[2] != 3 or x.shape[3] != np.size(y):
        raise layout_error(task, data_location, path,
                           "needs 'X' of shape (32, 32, 3, N) and 'y' of N labels")
    if x.dtype != np.uint8:  # a cast would wrap values above 255 silently
        raise layout_error(task, data_location, path, f"'X' has dtype {x.dtype}, expected uint8")
    labels = np.asarray(y, dtype=np.int64).reshape(-1)
    bad = labels[(labels < 0) | (labels > 10)]
    if bad.size:
        raise layout_error(task, data_location, path,
                           f"label {int(bad[0])} (and {bad.size - 1} more) outside 1..10 (10 is "
                           f"the digit 0); the file is corrupt or of another dataset")
    labels[labels == 10] = 0  # the .mat files label the digit 0 as 10
    # (H, W, C, N) → (N, H, W, C) as a view; PIL copies each image when it is indexed.
    return ArrayDataset(np.transpose(x.astype(np.uint8, copy=False), (3, 0, 1, 2)), labels, transform)


def read_svhn(data_location: str, transform=None) -> TaskData:
    task = "SVHN"
    root = os.path.join(data_location, "svhn")
    splits = {split: LazyDataset(functools.partial(
        _load_svhn, data_location,
        _require_file(task, data_location, os.path.join(root, f"{split}_32x32.mat")), transform))
        for split in ("train", "test")}
    return TaskData(task, list(CLASSNAMES[task]), get_templates(task), test=splits["test"],
                    train=splits["train"], info={"root": root, "test_split": "test"})


def read_gzip(path: str) -> bytes:
    """The whole decompressed content of a `.gz` file; ValueError if it is truncated or corrupt
    (gzip itself raises EOFError, BadGzipFile or zlib.error, which name no file)."""
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"truncated or corrupt gzip file ({type(e).__name__}: {e})") from None


def read_idx(path: str) -> np.ndarray:
    """An idx file (MNIST's format): zero, zero, dtype code 0x08 (uint8), ndim, big-endian int32
    dims, raw data. Uncompressed files are memory-mapped; `.gz` files are read into memory."""
    with io.BytesIO(read_gzip(path)) if path.endswith(".gz") else open(path, "rb") as f:
        head = f.read(4)
        if len(head) != 4 or head[:2] != b"\0\0" or head[2] != 0x08 or not 1 <= head[3] <= 4:
            raise ValueError(f"not a uint8 idx file (header {head!r})")
        dims = tuple(int(d) for d in np.frombuffer(f.read(4 * head[3]), dtype=">i4"))
        offset = 4 + 4 * head[3]
        if not path.endswith(".gz"):
            expected = offset + int(np.prod(dims))
            if os.path.getsize(path) != expected:
                raise ValueError(f"size {os.path.getsize(path)} bytes, expected {expected} "
                                 f"for dims {dims}")
            return np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=dims)
        data = np.frombuffer(f.read(), dtype=np.uint8)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{data.size} values, expected {int(np.prod(dims))} for dims {dims}")
    return data.reshape(dims)


def read_mnist(data_location: str, transform=None) -> TaskData:
    task = "MNIST"
    raw = _require_dir(task, data_location, os.path.join(data_location, "MNIST", "raw"))

    def load(stem: str) -> tuple[str, np.ndarray]:
        path = os.path.join(raw, stem)
        if not os.path.isfile(path) and os.path.isfile(path + ".gz"):
            path += ".gz"
        _require_file(task, data_location, path)
        try:
            return path, read_idx(path)
        except ValueError as e:
            raise layout_error(task, data_location, path, f"malformed idx file ({e})") from None

    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        _, images = load(f"{prefix}-images-idx3-ubyte")
        labels_path, labels = load(f"{prefix}-labels-idx1-ubyte")
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise layout_error(task, data_location, os.path.join(raw, f"{prefix}-*"),
                               f"images {images.shape} and labels {labels.shape} do not match")
        if labels.size and int(labels.max()) >= len(CLASSNAMES[task]):
            where = int(np.argmax(labels >= len(CLASSNAMES[task])))
            raise layout_error(task, data_location, labels_path,
                               f"label {int(labels[where])} of image {where} is outside "
                               f"0..{len(CLASSNAMES[task]) - 1}; the file is corrupt or of "
                               f"another dataset")
        splits[split] = ArrayDataset(images, labels, transform)
    return TaskData(task, list(CLASSNAMES[task]), get_templates(task), test=splits["test"],
                    train=splits["train"], info={"root": raw, "test_split": "test"})


READERS: dict[str, Callable[..., TaskData]] = {
    "SUN397": read_sun397,
    "Cars": read_cars,
    "RESISC45": read_resisc45,
    "EuroSAT": read_eurosat,
    "SVHN": read_svhn,
    "GTSRB": read_gtsrb,
    "MNIST": read_mnist,
    "DTD": read_dtd,
}
