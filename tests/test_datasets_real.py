"""The 8 real tasks' readers, `<Task>Val` splits and templates, on tiny layouts built in tmp_path.

Every image's colour encodes its label (red = 5·label mod 255) and position (green), so reading an image back
checks that files, labels and the decoded pixels stay paired."""
import gzip
import os

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from taskmerge.datasets import DatasetLayoutError, get_task, get_templates, registry, templates
from taskmerge.datasets.real import read_idx


def as_array(img):
    """Test transform: the PIL image the reader produced, as an (H, W, C) array."""
    assert img.mode == "RGB"
    return np.asarray(img)


def write_image(path, label, k=0, size=16):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (size, size), (5 * label % 255, k % 250, 77)).save(path)


def red(img):
    return int(round(float(img[..., 0].mean())))


def check_pairs(dataset, tol=0):
    """Decoded colour matches the label for every sample."""
    for i in range(len(dataset)):
        img, label = dataset[i]
        assert abs(red(img) - 5 * label % 255) <= tol, (i, label, red(img))


# ---------------------------------------------------------------- layout builders
def make_folder_split(root, counts, ext=".png", start=0):
    """root/<class>/img_<k><ext> with counts[class] images; label = index of class in sorted order."""
    classes = sorted(counts)
    k = start
    for label, cls in enumerate(classes):
        for _ in range(counts[cls]):
            write_image(os.path.join(root, cls, f"img_{k:04d}{ext}"), label, k)
            k += 1
    return k


# Two named SUN397 classes and 395 more ("z_class_###", sorted after them), one image each.
SUN397_FOLDERS = ["a_abbey", "b_bus_interior"] + [f"z_class_{i:03d}" for i in range(395)]


def make_sun397(data, test_name="test", ext=".jpg"):
    rest = {c: 1 for c in SUN397_FOLDERS[2:]}
    make_folder_split(os.path.join(data, "sun397", "train"),
                      {"a_abbey": 3, "b_bus_interior": 4, **rest}, ext)
    make_folder_split(os.path.join(data, "sun397", test_name),
                      {"a_abbey": 2, "b_bus_interior": 1, **rest}, ext, start=1000)
    # ImageFolder walks sub-folders and skips non-image files; so must we.
    write_image(os.path.join(data, "sun397", test_name, "b_bus_interior", "nested", "x.jpg"), 1, 200)
    with open(os.path.join(data, "sun397", "train", "a_abbey", "notes.txt"), "w") as f:
        f.write("not an image")


EUROSAT_FOLDERS = ["AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial", "Pasture",
                   "PermanentCrop", "Residential", "River", "SeaLake"]


def make_dtd(data, train: dict, test: dict, test_name="test"):
    """DTD's 47 class folders: `train` / `test` counts for some, one image in every other."""
    rest = {c: 1 for c in templates.DTD_FOLDERS}
    make_folder_split(os.path.join(data, "dtd", "train"), {**rest, **train})
    make_folder_split(os.path.join(data, "dtd", test_name), {**rest, **test}, start=1000)


def make_eurosat(data):
    for split, n in (("train", 3), ("val", 1), ("test", 2)):
        make_folder_split(os.path.join(data, "EuroSAT_splits", split), {c: n for c in EUROSAT_FOLDERS})


def make_resisc45(data):
    root = os.path.join(data, "resisc45")
    for label, cls in enumerate(templates.RESISC45_FOLDERS):
        for k in (1, 2, 3):
            write_image(os.path.join(root, "NWPU-RESISC45", cls, f"{cls}_{k:03d}.png"), label, k, size=8)
    lists = {"train": [1, 2], "val": [], "test": [3]}
    for split, ks in lists.items():
        with open(os.path.join(root, f"resisc45-{split}.txt"), "w") as f:
            f.writelines(f"{cls}_{k:03d}.png\n" for cls in templates.RESISC45_FOLDERS for k in ks)


def cars_annotations(fnames, classes):
    rec = np.zeros(len(fnames), dtype=[("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"),
                                       ("bbox_y2", "O"), ("class", "O"), ("fname", "O")])
    for i, (f, c) in enumerate(zip(fnames, classes)):
        rec[i] = (1, 1, 8, 8, c, f)
    return {"annotations": rec}


# Stanford Cars' 196 classes: three real names, then stand-ins.
CARS_NAMES = (["AM General Hummer SUV 2000", "Acura RL Sedan 2012", "Audi_TT Coupe 2012"]
              + [f"Car {i} 2012" for i in range(193)])


def make_cars(data, test_annos_in_devkit=True):
    root = os.path.join(data, "stanford_cars")
    os.makedirs(os.path.join(root, "devkit"))
    scipy.io.savemat(os.path.join(root, "devkit", "cars_meta.mat"),
                     {"class_names": np.array(CARS_NAMES, dtype=object)})
    splits = {"train": [1, 3, 2, 1, 3], "test": [2, 2, 3, 1]}  # 1-based classes, as in the .mat
    for split, classes in splits.items():
        fnames = [f"{i + 1:05d}.jpg" for i in range(len(classes))]
        for i, (f, c) in enumerate(zip(fnames, classes)):
            write_image(os.path.join(root, f"cars_{split}", f), c - 1, i)
        if split == "train":
            mat = os.path.join(root, "devkit", "cars_train_annos.mat")
        elif test_annos_in_devkit:
            mat = os.path.join(root, "devkit", "cars_test_annos_withlabels.mat")
        else:
            mat = os.path.join(root, "cars_test_annos_withlabels.mat")
        scipy.io.savemat(mat, cars_annotations(fnames, classes))
    return splits


def make_gtsrb(data, test_labels=(14, 0, 42, 14)):
    root = os.path.join(data, "gtsrb")
    for c in range(43):
        folder = os.path.join(root, "GTSRB", "Training", f"{c:05d}")
        for k in range(2 if c == 2 else 1):
            write_image(os.path.join(folder, f"00000_{k:05d}.ppm"), c, k, size=8)
        with open(os.path.join(folder, f"GT-{c:05d}.csv"), "w") as f:  # shipped with the images
            f.write("Filename;ClassId\n")
    images = os.path.join(root, "GTSRB", "Final_Test", "Images")
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i, c in enumerate(test_labels):
        write_image(os.path.join(images, f"{i:05d}.ppm"), c, i, size=8)
        rows.append(f"{i:05d}.ppm;8;8;0;0;7;7;{c}")
    with open(os.path.join(root, "GT-final_test.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")


def write_idx(path, array, compress=False):
    array = np.ascontiguousarray(array, dtype=np.uint8)
    head = bytes([0, 0, 0x08, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with (gzip.open if compress else open)(path + (".gz" if compress else ""), "wb") as f:
        f.write(head + array.tobytes())


def make_mnist(data, n_train=20, n_test=10, size=28, compress=False):
    raw = os.path.join(data, "MNIST", "raw")
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = np.broadcast_to((labels * 5)[:, None, None], (n, size, size))
        write_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), images, compress)
        write_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), labels, compress)


def make_svhn(data):
    rng = np.random.default_rng(0)
    out = {}
    for split, n in (("train", 12), ("test", 5)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n) % 10 + 1).reshape(n, 1)  # labels 1..10, 10 meaning the digit 0
        os.makedirs(os.path.join(data, "svhn"), exist_ok=True)
        scipy.io.savemat(os.path.join(data, "svhn", f"{split}_32x32.mat"), {"X": x, "y": y})
        out[split] = (x, y)
    return out


# ---------------------------------------------------------------- folder tasks
@pytest.mark.parametrize("test_name", ["test", "val"])
def test_sun397_both_family_layouts(tmp_path, test_name):
    make_sun397(str(tmp_path), test_name)
    task = get_task("SUN397", str(tmp_path), as_array)
    assert task.name == "SUN397"
    assert task.classnames[:3] == ["abbey", "bus interior", "class 000"] and len(task.classnames) == 397
    assert task.templates == ["a photo of a {c}.", "a photo of the {c}."]
    assert task.info["test_split"] == test_name
    assert len(task.train) == 7 + 395 and len(task.test) == 4 + 395  # notes.txt skipped, nested kept
    assert task.train.labels[:8] == [0, 0, 0, 1, 1, 1, 1, 2]
    assert task.test.labels[:5] == [0, 0, 1, 1, 2] and task.test.labels[-1] == 396
    check_pairs(task.train, tol=3)  # jpeg
    check_pairs(task.test, tol=3)


def test_test_folder_preferred_over_val(tmp_path):
    make_sun397(str(tmp_path), "val")
    make_folder_split(str(tmp_path / "sun397" / "test"), {c: 1 for c in SUN397_FOLDERS})
    task = get_task("SUN397", str(tmp_path), as_array)
    assert task.info["test_split"] == "test" and len(task.test) == 397


def test_test_class_unknown_to_train_is_an_error(tmp_path):
    make_sun397(str(tmp_path))
    make_folder_split(str(tmp_path / "sun397" / "test"), {"c_canyon": 1})
    with pytest.raises(DatasetLayoutError, match="c_canyon"):
        get_task("SUN397", str(tmp_path), as_array)


@pytest.mark.parametrize("test_name", ["test", "val"])
def test_dtd(tmp_path, test_name):
    make_dtd(str(tmp_path), {"banded": 2, "zigzagged": 3}, {"polka-dotted": 2}, test_name)
    task = get_task("DTD", str(tmp_path), as_array)
    assert task.classnames == templates.DTD_FOLDERS and task.classnames[-1] == "zigzagged"
    assert len(task.templates) == 8
    assert (len(task.train), len(task.test)) == (47 + 1 + 2, 47 + 1)
    assert task.test.labels.count(templates.DTD_FOLDERS.index("polka-dotted")) == 2
    check_pairs(task.test)


def test_eurosat_and_its_real_val_folder(tmp_path):
    make_eurosat(str(tmp_path))
    task = get_task("EuroSAT", str(tmp_path), as_array)
    assert task.classnames == [
        "annual crop land", "forest", "brushland or shrubland", "highway or road",
        "industrial buildings or commercial buildings", "pasture land", "permanent crop land",
        "residential buildings or homes or apartments", "river", "lake or sea"]
    assert (len(task.train), len(task.test)) == (30, 20)
    check_pairs(task.test)
    val = get_task("EuroSATVal", str(tmp_path), as_array)
    assert val.name == "EuroSATVal" and val.classnames == task.classnames
    assert (len(val.train), len(val.test)) == (30, 10)  # the whole train folder; the val folder
    assert all("/val/" in p for p, _ in val.test.samples)


def test_eurosat_unknown_class_folder(tmp_path):
    make_eurosat(str(tmp_path))
    make_folder_split(str(tmp_path / "EuroSAT_splits" / "train"), {"Glacier": 1})
    with pytest.raises(DatasetLayoutError, match="Glacier"):
        get_task("EuroSAT", str(tmp_path), as_array)


def test_resisc45_split_lists(tmp_path):
    make_resisc45(str(tmp_path))
    task = get_task("RESISC45", str(tmp_path), as_array)
    assert task.classnames[:3] == ["airplane", "airport", "baseball diamond"]
    assert len(task.classnames) == 45 and len(task.templates) == 18
    assert (len(task.train), len(task.test)) == (90, 45)
    assert all(p.endswith("_003.png") for p, _ in task.test.samples)
    assert task.test.labels == list(range(45))
    check_pairs(task.test)


def test_resisc45_listed_file_missing(tmp_path):
    make_resisc45(str(tmp_path))
    os.remove(tmp_path / "resisc45" / "NWPU-RESISC45" / "river" / "river_003.png")
    with pytest.raises(DatasetLayoutError, match="river_003.png") as e:
        get_task("RESISC45", str(tmp_path), as_array)
    assert "resisc45-test.txt" in str(e.value)


def test_resisc45_missing_split_file(tmp_path):
    make_resisc45(str(tmp_path))
    os.remove(tmp_path / "resisc45" / "resisc45-train.txt")
    with pytest.raises(DatasetLayoutError, match="resisc45-train.txt"):
        get_task("RESISC45", str(tmp_path), as_array)


# ---------------------------------------------------------------- .mat / csv / idx tasks
@pytest.mark.parametrize("in_devkit", [True, False])
def test_cars_test_annotations_in_either_place(tmp_path, in_devkit):
    splits = make_cars(str(tmp_path), in_devkit)
    task = get_task("Cars", str(tmp_path), as_array)
    assert task.classnames[:3] == ["AM General Hummer SUV 2000", "Acura RL Sedan 2012",
                                   "Audi TT Coupe 2012"] and len(task.classnames) == 196
    assert len(task.templates) == 8
    assert task.train.labels == [c - 1 for c in splits["train"]]
    assert task.test.labels == [c - 1 for c in splits["test"]]
    assert (os.path.dirname(task.info["test_annotations"]) == str(tmp_path / "stanford_cars" / "devkit")) \
        == in_devkit
    check_pairs(task.train, tol=3)
    check_pairs(task.test, tol=3)


def test_cars_errors(tmp_path):
    make_cars(str(tmp_path))
    devkit = tmp_path / "stanford_cars" / "devkit"
    # the unlabelled release of the test annotations has no 'class' field
    scipy.io.savemat(str(devkit / "cars_test_annos_withlabels.mat"),
                     {"annotations": np.zeros(2, dtype=[("fname", "O")])})
    with pytest.raises(DatasetLayoutError, match="withlabels"):
        get_task("Cars", str(tmp_path), as_array)
    os.remove(devkit / "cars_test_annos_withlabels.mat")
    with pytest.raises(DatasetLayoutError, match="cars_test_annos_withlabels.mat or") as e:
        get_task("Cars", str(tmp_path), as_array)
    assert "devkit/cars_meta.mat" in str(e.value)  # the expected layout is shown
    (devkit / "cars_meta.mat").write_bytes(b"garbage")
    with pytest.raises(DatasetLayoutError, match="cars_meta.mat"):
        get_task("Cars", str(tmp_path), as_array)


def test_gtsrb(tmp_path):
    make_gtsrb(str(tmp_path))
    task = get_task("GTSRB", str(tmp_path), as_array)
    assert task.classnames[14] == "stop" and len(task.classnames) == 43
    assert len(task.train) == 44  # one image per class, two in class 2; the per-class csv skipped
    assert task.test.labels == [14, 0, 42, 14]
    check_pairs(task.train)
    check_pairs(task.test)


def test_gtsrb_malformed_csv(tmp_path):
    make_gtsrb(str(tmp_path))
    csv_path = tmp_path / "gtsrb" / "GT-final_test.csv"
    csv_path.write_text(csv_path.read_text().replace(";", ","))
    with pytest.raises(DatasetLayoutError, match="Filename and ClassId"):
        get_task("GTSRB", str(tmp_path), as_array)
    os.remove(csv_path)
    with pytest.raises(DatasetLayoutError, match="GT-final_test.csv"):
        get_task("GTSRB", str(tmp_path), as_array)


def test_svhn_reads_mat_lazily_and_maps_10_to_0(tmp_path):
    arrays = make_svhn(str(tmp_path))
    task = get_task("SVHN", str(tmp_path), as_array)
    assert task.classnames == [str(d) for d in range(10)]
    assert len(task.test) == 5 and len(task.train) == 12
    x, y = arrays["test"]
    for i in range(5):
        img, label = task.test[i]
        assert np.array_equal(img, x[:, :, :, i])
        assert label == int(y[i, 0]) % 10
    assert task.train[9][1] == 0  # stored as 10


def test_svhn_malformed_mat_fails_on_first_use(tmp_path):
    (tmp_path / "svhn").mkdir()
    (tmp_path / "svhn" / "train_32x32.mat").write_bytes(b"garbage")
    scipy.io.savemat(str(tmp_path / "svhn" / "test_32x32.mat"), {"X": np.zeros((32, 32, 3, 2))})
    task = get_task("SVHN", str(tmp_path), as_array)  # nothing read yet
    with pytest.raises(DatasetLayoutError, match="test_32x32.mat"):
        len(task.test)
    with pytest.raises(DatasetLayoutError, match="train_32x32.mat"):
        task.train[0]


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_idx(tmp_path, compress):
    make_mnist(str(tmp_path), compress=compress)
    task = get_task("MNIST", str(tmp_path), as_array)
    assert task.templates == ['a photo of the number: "{c}".']
    assert (len(task.train), len(task.test)) == (20, 10)
    img, label = task.test[7]
    assert img.shape == (28, 28, 3) and label == 7  # grey digits come out as RGB
    check_pairs(task.train)


def test_read_idx_rejects_truncated_file(tmp_path):
    make_mnist(str(tmp_path))
    path = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(ValueError, match="expected"):
        read_idx(str(path))
    with pytest.raises(DatasetLayoutError, match="t10k-images-idx3-ubyte"):
        get_task("MNIST", str(tmp_path), as_array)


def test_clip_eval_transform_gives_224_px_tensors(tmp_path):
    from taskmerge.models.encoders import eval_transform
    make_mnist(str(tmp_path), n_train=10, n_test=2)
    img, label = get_task("MNIST", str(tmp_path), eval_transform(224)).test[1]
    assert isinstance(img, torch.Tensor) and img.shape == (3, 224, 224) and label == 1


# ---------------------------------------------------------------- <Task>Val
def test_val_sizes():
    assert registry.val_sizes(60000) == (55000, 5000)  # capped at 5000
    assert registry.val_sizes(25) == (23, 2)  # int(2.5)
    assert registry.val_sizes(9) == (9, 0)


def test_mnistval_matches_task_vectors_split(tmp_path):
    # task_vectors asserts this for MNISTVal: the same procedure on a 60,000-image train set.
    make_mnist(str(tmp_path), n_train=60000, n_test=1, size=1)
    val = get_task("MNISTVal", str(tmp_path), as_array)
    assert val.train.indices[0] == 36044
    assert (len(val.train), len(val.test)) == (55000, 5000)


def test_val_split_deterministic_disjoint_and_complete(tmp_path):
    make_dtd(str(tmp_path), {"banded": 12, "bubbly": 13}, {})
    a = get_task("DTDVal", str(tmp_path), as_array)
    b = get_task("DTDVal", str(tmp_path), as_array)
    base = get_task("DTD", str(tmp_path), as_array)
    assert a.name == "DTDVal" and a.classnames == base.classnames and a.templates == base.templates
    assert (len(a.train), len(a.test)) == (63, 7)  # 70 training images: 25 + one per other class
    assert a.test.indices == b.test.indices and a.train.indices == b.train.indices
    assert sorted(a.train.indices + a.test.indices) == list(range(70))
    # the held-out samples are the base training set's, labels and pixels included
    for i, j in enumerate(a.test.indices):
        assert a.test[i][1] == base.train[j][1]
        assert np.array_equal(a.test[i][0], base.train[j][0])


def test_val_split_too_small(tmp_path):
    make_mnist(str(tmp_path), n_train=9, n_test=2)  # 10 % of 9 images is none
    with pytest.raises(ValueError, match="too few"):
        get_task("MNISTVal", str(tmp_path), as_array)


# ---------------------------------------------------------------- laziness and errors
def test_construction_does_not_decode_images(tmp_path):
    for split in ("train", "test"):
        for cls in templates.DTD_FOLDERS:
            for k in range(3 if cls == "banded" else 1):
                path = tmp_path / "dtd" / split / cls / f"{k}.jpg"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(b"not a jpeg")
    task = get_task("DTD", str(tmp_path), as_array)
    assert len(task.test) == 3 + 46
    with pytest.raises(DatasetLayoutError, match="0.jpg"):
        task.test[0]


@pytest.mark.parametrize("name,expected", [
    ("SUN397", "sun397/train"), ("Cars", "stanford_cars/devkit"), ("RESISC45", "resisc45/NWPU-RESISC45"),
    ("EuroSAT", "EuroSAT_splits/train"), ("SVHN", "svhn/train_32x32.mat"),
    ("GTSRB", "gtsrb/GTSRB/Training"), ("MNIST", "MNIST/raw"), ("DTD", "dtd/train"),
    ("MNISTVal", "MNIST/raw")])
def test_missing_data_gives_one_clear_error(tmp_path, name, expected):
    with pytest.raises(DatasetLayoutError) as e:
        get_task(name, str(tmp_path), as_array)
    msg = str(e.value)
    assert msg.startswith(registry.base_task(name) + ":")
    assert os.path.join(str(tmp_path), expected) in msg  # the path looked for
    assert "Expected under data_location" in msg and "data/README.md" in msg


def test_unknown_task_lists_known_names(tmp_path):
    with pytest.raises(ValueError, match="unknown task 'Nope'.*'SUN397'.*'MNISTVal'"):
        get_task("Nope", str(tmp_path), as_array)
    with pytest.raises(DatasetLayoutError, match="cifar-10-batches-py"):  # a task with no data here
        get_task("CIFAR10", str(tmp_path), as_array)
    with pytest.raises(ValueError, match="unknown task 'LowResDigits'"):
        get_task("LowResDigits", str(tmp_path), as_array)  # embedded tasks are not the registry's


# ---------------------------------------------------------------- templates and task lists
def test_templates_of_the_core_tasks():
    counts = {"SUN397": 2, "Cars": 8, "RESISC45": 18, "EuroSAT": 3, "SVHN": 1, "GTSRB": 3,
              "MNIST": 1, "DTD": 8}  # METHODS.md §5.1
    for name, n in counts.items():
        assert len(get_templates(name)) == n == len(set(get_templates(name)))
        assert get_templates(name + "Val") == get_templates(name)
    for name, tpls in templates.TEMPLATES.items():
        for t in tpls:
            assert t.count("{c}") == 1 and "{c}" not in t.format(c="x"), (name, t)
    assert get_templates("GTSRB")[0].format(c="stop") == 'a zoomed in photo of a "stop" traffic sign.'
    with pytest.raises(ValueError, match="no prompt templates"):
        get_templates("Nope")


def test_fixed_class_names():
    # RESISC45 labels come from sorted folders and names from the list: they must agree.
    assert templates.RESISC45_FOLDERS == sorted(templates.RESISC45_FOLDERS)
    assert len(templates.CLASSNAMES["RESISC45"]) == 45 and len(templates.GTSRB_CLASSNAMES) == 43
    assert len(templates.FLOWERS102_CLASSNAMES) == 102
    assert templates.sun397_classname("b_bus_interior") == "bus interior"
    with pytest.raises(KeyError):
        templates.eurosat_classname("Glacier")


def test_task_lists():
    assert sorted(registry.PAPER_8) == sorted(registry.TALL_8) == sorted(registry.REAL_TASKS[:8])
    assert registry.REAL_TASKS == registry.TALL_20 and set(registry.READERS) == set(registry.TALL_20)
    assert registry.TALL_20[:14] == registry.TALL_14 and registry.TALL_14[:8] == registry.TALL_8
    assert len(set(registry.TALL_20)) == 20
    assert all(t in templates.TEMPLATES for t in registry.TALL_20)


# ---------------------------------------------------------------- real data checked against its task
@pytest.mark.parametrize("task, split_root, remove", [
    ("DTD", "dtd/train", "lined"), ("DTD", "dtd/test", "zigzagged"),
    ("EuroSAT", "EuroSAT_splits/train", "Highway"), ("EuroSAT", "EuroSAT_splits/test", "River"),
    ("GTSRB", "gtsrb/GTSRB/Training", "00005"), ("SUN397", "sun397/train", "b_bus_interior"),
    ("SUN397", "sun397/test", "a_abbey")])
def test_a_missing_class_folder_is_refused_naming_it(tmp_path, task, split_root, remove):
    # A missing folder would shift every later label by one against the head's classes.
    {"DTD": lambda d: make_dtd(d, {}, {}), "EuroSAT": make_eurosat, "GTSRB": make_gtsrb,
     "SUN397": make_sun397}[task](str(tmp_path))
    import shutil
    shutil.rmtree(tmp_path / split_root / remove)
    with pytest.raises(DatasetLayoutError) as err:
        get_task(task, str(tmp_path), as_array)
    message = str(err.value)
    assert message.startswith(f"{task}:") and str(tmp_path / split_root) in message
    assert (remove in message) if task != "SUN397" or split_root.endswith("test") else "396" in message


@pytest.mark.parametrize("task, split_root, extra", [
    ("DTD", "dtd/train", "zig_zagged"), ("EuroSAT", "EuroSAT_splits/test", "Glacier"),
    ("GTSRB", "gtsrb/GTSRB/Training", "00043"), ("SUN397", "sun397/train", "c_canyon")])
def test_an_extra_class_folder_is_refused_naming_it(tmp_path, task, split_root, extra):
    {"DTD": lambda d: make_dtd(d, {}, {}), "EuroSAT": make_eurosat, "GTSRB": make_gtsrb,
     "SUN397": make_sun397}[task](str(tmp_path))
    write_image(str(tmp_path / split_root / extra / "x.ppm"), 0)
    with pytest.raises(DatasetLayoutError) as err:
        get_task(task, str(tmp_path), as_array)
    assert (extra if task != "SUN397" else "398") in str(err.value)


def test_a_renamed_gtsrb_folder_is_refused_though_the_count_matches(tmp_path):
    make_gtsrb(str(tmp_path))
    root = tmp_path / "gtsrb" / "GTSRB" / "Training"
    os.rename(root / "00005", root / "00050")
    with pytest.raises(DatasetLayoutError, match=r"missing \['00005'\].*unexpected \['00050'\]"):
        get_task("GTSRB", str(tmp_path), as_array)


def test_an_empty_class_folder_is_refused(tmp_path):
    make_dtd(str(tmp_path), {}, {})
    os.remove(tmp_path / "dtd" / "test" / "woven" / os.listdir(tmp_path / "dtd" / "test" / "woven")[0])
    with pytest.raises(DatasetLayoutError, match=r"(?s)no images.*woven"):
        get_task("DTD", str(tmp_path), as_array)


def test_a_symlink_loop_in_a_class_folder_is_refused(tmp_path):
    make_dtd(str(tmp_path), {}, {})
    cls = tmp_path / "dtd" / "train" / "banded"
    os.symlink(cls, cls / "again")  # banded/again/again/... would repeat banded's images
    with pytest.raises(DatasetLayoutError) as err:
        get_task("DTD", str(tmp_path), as_array)
    assert str(cls / "again") in str(err.value) and "symlink" in str(err.value)


def test_a_link_to_another_class_folder_is_refused(tmp_path):
    make_dtd(str(tmp_path), {}, {})
    split = tmp_path / "dtd" / "test"
    os.symlink(split / "woven", split / "banded" / "more")  # woven's images labelled banded too
    with pytest.raises(DatasetLayoutError, match="more"):
        get_task("DTD", str(tmp_path), as_array)


def test_a_symlinked_class_folder_outside_the_split_is_read(tmp_path):
    make_dtd(str(tmp_path), {}, {})
    split = tmp_path / "dtd" / "train"
    os.rename(split / "banded", tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", split / "banded")  # e.g. a dataset on another disk
    assert len(get_task("DTD", str(tmp_path), as_array).train) == 47


@pytest.mark.parametrize("bad", [10, 255])
def test_mnist_labels_out_of_range_are_refused_naming_file_and_value(tmp_path, bad):
    make_mnist(str(tmp_path))
    path = tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    data = bytearray(path.read_bytes())
    data[-2] = bad
    path.write_bytes(bytes(data))
    with pytest.raises(DatasetLayoutError) as err:
        get_task("MNIST", str(tmp_path), as_array)
    assert str(path) in str(err.value) and str(bad) in str(err.value) and "0..9" in str(err.value)


def test_svhn_labels_out_of_range_are_refused_naming_file_and_value(tmp_path):
    make_svhn(str(tmp_path))
    path = tmp_path / "svhn" / "test_32x32.mat"
    mat = scipy.io.loadmat(str(path))
    mat["y"][3, 0] = 11
    scipy.io.savemat(str(path), {"X": mat["X"], "y": mat["y"]})
    task = get_task("SVHN", str(tmp_path), as_array)
    with pytest.raises(DatasetLayoutError) as err:
        len(task.test)
    assert str(path) in str(err.value) and "11" in str(err.value)


def test_a_gtsrb_class_id_out_of_range_is_refused_naming_the_value(tmp_path):
    make_gtsrb(str(tmp_path), test_labels=(14, 43, 0))
    with pytest.raises(DatasetLayoutError, match=r"(?s)ClassId 43 of 00001\.ppm.*GT-final_test\.csv"):
        get_task("GTSRB", str(tmp_path), as_array)


@pytest.mark.parametrize("cut", ["half", "tail"])
def test_a_truncated_gz_file_is_refused_naming_it(tmp_path, cut):
    make_mnist(str(tmp_path), compress=True)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if cut == "half" else data[:-5])
    with pytest.raises(DatasetLayoutError) as err:
        get_task("MNIST", str(tmp_path), as_array)
    assert str(path) in str(err.value) and "truncated or corrupt" in str(err.value)


def test_a_gz_file_that_is_not_gzip_is_refused_naming_it(tmp_path):
    make_mnist(str(tmp_path), compress=True)
    path = tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(b"this is not gzip data")
    with pytest.raises(DatasetLayoutError, match="t10k-labels-idx1-ubyte.gz"):
        get_task("MNIST", str(tmp_path), as_array)


# ---------------------------------------------------------------- other malformed files
def test_a_cars_meta_without_196_classes_is_refused(tmp_path):
    make_cars(str(tmp_path))
    scipy.io.savemat(str(tmp_path / "stanford_cars" / "devkit" / "cars_meta.mat"),
                     {"class_names": np.array(CARS_NAMES[:-1], dtype=object)})
    with pytest.raises(DatasetLayoutError, match=r"(?s)195 class names, expected 196.*cars_meta"):
        get_task("Cars", str(tmp_path), as_array)


def test_a_cars_class_that_is_not_a_number_is_refused(tmp_path):
    make_cars(str(tmp_path))
    mat = str(tmp_path / "stanford_cars" / "devkit" / "cars_train_annos.mat")
    annotations = cars_annotations(["00001.jpg"], ["seven"])
    scipy.io.savemat(mat, annotations)
    with pytest.raises(DatasetLayoutError, match=r"(?s)'seven'.*cars_train_annos"):
        get_task("Cars", str(tmp_path), as_array)


def test_svhn_images_that_are_not_uint8_are_refused(tmp_path):
    make_svhn(str(tmp_path))
    path = tmp_path / "svhn" / "test_32x32.mat"
    mat = scipy.io.loadmat(str(path))
    scipy.io.savemat(str(path), {"X": mat["X"].astype(np.float64) * 2, "y": mat["y"]})
    with pytest.raises(DatasetLayoutError, match=r"(?s)float64.*test_32x32.mat"):
        len(get_task("SVHN", str(tmp_path), as_array).test)


@pytest.mark.parametrize("which", ["gtsrb", "resisc45"])
def test_a_split_list_that_is_not_text_is_refused(tmp_path, which):
    if which == "gtsrb":
        make_gtsrb(str(tmp_path))
        path = tmp_path / "gtsrb" / "GT-final_test.csv"
    else:
        make_resisc45(str(tmp_path))
        path = tmp_path / "resisc45" / "resisc45-test.txt"
    path.write_bytes(b"\xff\xfe\x00binary\x80\x81")
    with pytest.raises(DatasetLayoutError, match=os.path.basename(path)):
        get_task("GTSRB" if which == "gtsrb" else "RESISC45", str(tmp_path), as_array)


def test_an_image_too_large_to_decode_is_a_layout_error(tmp_path, monkeypatch):
    make_dtd(str(tmp_path), {}, {})
    task = get_task("DTD", str(tmp_path), as_array)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)  # our 16×16 images are now "bombs"
    with pytest.raises(DatasetLayoutError, match=r"img_1000\.png"):
        task.test[0]
