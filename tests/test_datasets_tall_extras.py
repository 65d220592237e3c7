"""The 12 tasks the 14/20-task benchmarks add, read from tiny copies of their folder layouts: labels,
class names and templates, image/label pairing, `<Task>Val` determinism, and one clear error each."""
import os
import pickle

import numpy as np
import pytest
from tall_trees import EXTRA_BUILDERS, N_TEST, N_TRAIN, make_cifar, make_idx_task, make_stl10

from taskmerge.datasets import DatasetLayoutError, get_task, registry, templates

EXTRAS = registry.TALL_20[8:]


def as_array(img):
    assert img.mode == "RGB"
    return np.asarray(img)


def red(img):
    return int(round(float(img[..., 0].mean())))


try:
    import h5py  # noqa: F401 (PCAM's files are HDF5; without h5py only PCAM's tests are skipped)
    HAVE_H5PY = True
except ImportError:
    HAVE_H5PY = False


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("extras"))
    written = {task: build(root) for task, build in EXTRA_BUILDERS.items() if HAVE_H5PY or task != "PCAM"}
    return root, written


@pytest.fixture(autouse=True)
def _pcam_needs_h5py(request):
    if not HAVE_H5PY and "PCAM" in request.node.name:
        pytest.skip("PCAM's .h5 files need h5py")


EXPECTED_COUNTS = {"STL10": 10, "OxfordIIITPet": 37, "Flowers102": 102, "CIFAR100": 100, "PCAM": 2,
                   "FER2013": 7, "CIFAR10": 10, "Food101": 101, "FashionMNIST": 10, "RenderedSST2": 2,
                   "EMNIST": 10, "KMNIST": 10}


def test_every_extra_has_a_reader():
    assert sorted(EXTRAS) == sorted(EXTRA_BUILDERS) == sorted(EXPECTED_COUNTS)


@pytest.mark.parametrize("task", EXTRAS)
def test_labels_names_templates_and_pixels(data, task):
    root, written = data
    t = get_task(task, root, as_array)
    assert t.name == task and t.num_classes == EXPECTED_COUNTS[task]
    assert t.templates == templates.get_templates(task) and t.templates
    for split, dataset in (("train", t.train), ("test", t.test)):
        labels = [int(dataset[i][1]) for i in range(len(dataset))]
        assert labels == list(written[task][split]), split
        tol = 4  # jpg
        for i in range(len(dataset)):
            img, label = dataset[i]
            assert abs(red(img) - 5 * label % 255) <= tol, (task, split, i, label, red(img))
    if task in templates.CLASSNAMES:
        assert t.classnames == templates.CLASSNAMES[task]


def test_data_derived_class_names(data):
    root, _ = data
    pets = get_task("OxfordIIITPet", root, as_array).classnames
    assert pets[:3] == ["Abyssinian", "American Bulldog", "American Pit Bull Terrier"]
    food = get_task("Food101", root, as_array).classnames
    assert food[:2] == ["apple_pie", "baby_back_ribs"]  # torchvision's .classes, as tall_masks prompts
    assert get_task("CIFAR100", root, as_array).classnames[:2] == ["class_000", "class_001"]
    fer = get_task("FER2013", root, as_array).classnames
    assert fer[3] == "['happy', 'smiling']"  # tall_masks formats the synonym list itself


def test_stl10_orientation(data):
    # the binary stores each channel column-major: the stored planes' left half is the top half
    root, _ = data
    img, _ = get_task("STL10", root, as_array).test[0]
    assert img.shape == (96, 96, 3)
    assert img[:48, :, 1].min() == 200 and img[48:, :, 1].max() == 0


@pytest.mark.parametrize("task", EXTRAS)
def test_val_split_is_seeded_held_out_part_of_train(data, task):
    root, _ = data
    a = get_task(task + "Val", root, as_array)
    b = get_task(task + "Val", root, as_array)
    n = len(get_task(task, root, as_array).train)
    val = int(0.1 * n)
    assert len(a.test) == val and len(a.train) == n - val
    assert list(a.test.indices) == list(b.test.indices)
    assert sorted(list(a.test.indices) + list(a.train.indices)) == list(range(n))
    assert a.classnames == get_task(task, root, as_array).classnames


def test_cifar_batches_go_through_the_restricted_unpickler(tmp_path):
    make_cifar(str(tmp_path))

    class Evil:
        def __reduce__(self):
            return os.system, ("echo pwned",)

    with open(tmp_path / "cifar-10-batches-py" / "data_batch_3", "wb") as f:
        pickle.dump({"data": Evil(), "labels": [0]}, f, protocol=2)
    task = get_task("CIFAR10", str(tmp_path), as_array)
    with pytest.raises(DatasetLayoutError, match="data_batch_3.*refusing to unpickle posix.system"):
        len(task.train)  # read on first use
    assert len(task.test) == N_TEST  # the test batch is another file


def test_cifar10_meta_of_another_dataset_is_refused(tmp_path):
    make_cifar(str(tmp_path))
    with open(tmp_path / "cifar-10-batches-py" / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["a", "b"]}, f, protocol=2)
    with pytest.raises(DatasetLayoutError, match="not CIFAR-10's"):
        get_task("CIFAR10", str(tmp_path), as_array)


def test_idx_tasks_accept_torchvisions_own_root_and_gzip(tmp_path):
    make_idx_task(str(tmp_path), "KMNIST", tall_masks_root=False, compress=True)
    t = get_task("KMNIST", str(tmp_path), as_array)
    assert len(t.train) == N_TRAIN and t.classnames[0] == "o"


def test_stl10_truncated_images_file(tmp_path):
    make_stl10(str(tmp_path))
    path = tmp_path / "stl10" / "stl10_binary" / "test_X.bin"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(DatasetLayoutError, match="bytes for 4 labels") as e:
        get_task("STL10", str(tmp_path), as_array)
    assert f"looked at: {path}" in str(e.value)


@pytest.mark.parametrize("task,expected", [
    ("STL10", os.path.join("stl10", "stl10_binary")), ("OxfordIIITPet", "oxford-iiit-pet"),
    ("Flowers102", os.path.join("flowers102", "flowers-102")), ("CIFAR100", "cifar-100-python"),
    ("PCAM", os.path.join("PCAM", "pcam")), ("CIFAR10", "cifar-10-batches-py"),
    ("Food101", os.path.join("food101", "food-101")), ("FashionMNIST", os.path.join("FashionMNIST", "raw")),
    ("RenderedSST2", "rendered-sst2"), ("EMNIST", os.path.join("EMNIST", "raw")),
    ("KMNIST", os.path.join("KMNIST", "raw")), ("FER2013", "fer-2013"),
])
def test_missing_data_names_the_layout(tmp_path, task, expected):
    with pytest.raises(DatasetLayoutError) as e:
        get_task(task, str(tmp_path), as_array)
    msg = str(e.value)
    assert msg.startswith(task + ":") and expected in msg


def test_food101_missing_class_is_refused(data, tmp_path):
    import json
    import shutil
    root, _ = data
    shutil.copytree(os.path.join(root, "food101"), tmp_path / "food101")
    meta_path = tmp_path / "food101" / "food-101" / "meta" / "test.json"
    meta = json.loads(meta_path.read_text())
    meta.pop("apple_pie")
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(DatasetLayoutError, match="100 classes, Food101 has 101"):
        get_task("Food101", str(tmp_path), as_array)
