"""The Hugging Face parquet datasets (datasets/parquet.py) on tiny snapshots written here with pyarrow, in
the schema HF writes: an image struct `{"bytes", "path"}` (PNG or JPEG from PIL), an int label, the
`ClassLabel` names in the schema's `huggingface` metadata, sharded and split into small row groups.

Every image's colour encodes its label (red = 5·label mod 255) and its row (green), so reading an image
back checks that shards, row groups, labels and decoded pixels stay paired."""
import copy
import io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from taskmerge.datasets import parquet, registry, templates
from taskmerge.datasets.base import TaskData
from taskmerge.datasets.parquet import (FUSIONBENCH_TASKS, HF_SOURCES, DatasetLayoutError, get_parquet_task,
                                        task_name)

# FusionBench's TALL20 task list (config/modelpool/CLIPVisionModelPool/clip-vit-base-patch32_TALL20.yaml).
FUSIONBENCH_TALL20 = ["sun397", "stanford-cars", "resisc45", "eurosat", "svhn", "gtsrb", "mnist", "dtd",
                      "oxford_flowers102", "pcam", "fer2013", "oxford-iiit-pet", "stl10", "cifar100",
                      "cifar10", "food101", "fashion_mnist", "emnist_letters", "kmnist", "rendered-sst2"]


def image_bytes(label, k, fmt="PNG", size=8):
    buf = io.BytesIO()
    r = 5 * label % 255 if isinstance(label, int) else 0  # a test's malformed label gets a black image
    Image.new("RGB", (size, size), (r, 3 * k % 250, 77)).save(buf, format=fmt)
    return buf.getvalue()


def hf_metadata(names):
    features = {"image": {"_type": "Image"}, "label": {"_type": "ClassLabel", "names": names}}
    return {b"huggingface": json.dumps({"info": {"features": features}}).encode()}


def write_shard(path, labels, start=0, fmt="PNG", names=None, row_group_size=3, label_type=pa.int64(),
                images=None):
    """One parquet shard as HF writes it; row k of the split (start + i) is coloured by its label."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if images is None:
        images = [{"bytes": image_bytes(y, start + i, fmt), "path": f"{start + i}.{fmt.lower()}"}
                  for i, y in enumerate(labels)]
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    table = pa.table({"image": pa.array(images, image_type), "label": pa.array(labels, label_type)})
    if names is not None:
        table = table.replace_schema_metadata(hf_metadata(names))
    pq.write_table(table, path, row_group_size=row_group_size)


def write_split(folder, split, labels, shards=2, **kw):
    """`folder/<split>-0000k-of-0000n.parquet`, the rows cut into `shards` files."""
    cuts = np.array_split(np.arange(len(labels)), shards)
    for k, idx in enumerate(cuts):
        write_shard(os.path.join(folder, f"{split}-{k:05d}-of-{shards:05d}.parquet"),
                    [int(labels[i]) for i in idx], start=int(idx[0]) if len(idx) else 0, **kw)


def cycle_labels(n, num_classes):
    return [(3 * i) % num_classes for i in range(n)]


def red(img):
    return int(round(float(np.asarray(img)[..., 0].mean())))


def green(img):
    return int(round(float(np.asarray(img)[..., 1].mean())))


def check_pairs(dataset, tol=0):
    for i in range(len(dataset)):
        img, label = dataset[i]
        assert abs(red(img) - 5 * label % 255) <= tol, (i, label, red(img))


def as_array(img):
    assert img.mode == "RGB"
    return np.asarray(img)


# ---------------------------------------------------------------- round trips in both layouts
def test_plain_folder_sharded_round_trip(tmp_path):
    """ylecun/mnist as `hf download --local-dir` leaves it: `mnist/{train,test}-….parquet`, 2 shards each,
    row groups of 3 (so indices cross row-group and shard boundaries)."""
    snap = tmp_path / "mnist"
    train_labels, test_labels = cycle_labels(20, 10), cycle_labels(11, 10)[::-1]
    write_split(str(snap / "mnist"), "train", train_labels)
    write_split(str(snap / "mnist"), "test", test_labels)
    task = get_parquet_task("MNIST", str(tmp_path), as_array)
    assert isinstance(task, TaskData) and task.name == "MNIST"
    assert task.classnames == templates.DIGITS and task.templates == templates.get_templates("MNIST")
    assert len(task.test) == 11 and len(task.train) == 20
    assert [task.test[i][1] for i in range(11)] == test_labels
    assert [task.train[i][1] for i in range(20)] == train_labels
    assert [green(task.train[i][0]) for i in range(20)] == [3 * i for i in range(20)]  # row order kept
    check_pairs(task.test)
    check_pairs(task.train)
    assert task.info["format"] == "parquet" and task.info["repo"] == "ylecun/mnist"
    # the dataset's own folder works as root too, and the FusionBench name as the task
    again = get_parquet_task("mnist", str(snap), as_array)
    assert [again.test[i][1] for i in range(11)] == test_labels


def write_hub_cache(root, repo, rev, build):
    cache = os.path.join(root, "datasets--" + repo.replace("/", "--"))
    os.makedirs(os.path.join(cache, "refs"), exist_ok=True)
    with open(os.path.join(cache, "refs", "main"), "w") as f:
        f.write(rev)
    build(os.path.join(cache, "snapshots", rev))
    return cache


def test_hub_cache_layout_follows_refs_main(tmp_path):
    """tanganke/eurosat in the hub cache, JPEG images; a stale second snapshot must not be read."""
    names = [f"{c[0].lower()}{c[1:]}" for c in templates.EUROSAT_FOLDERS]  # not our wording

    def build(snapshot, n_test=7):
        data = os.path.join(snapshot, "data")
        write_split(data, "train", cycle_labels(12, 10), fmt="JPEG", names=names)
        write_split(data, "validation", cycle_labels(5, 10), shards=1, fmt="JPEG", names=names)
        write_split(data, "test", cycle_labels(n_test, 10), fmt="JPEG", names=names)

    cache = write_hub_cache(str(tmp_path), "tanganke/eurosat", "abc123", build)
    build(os.path.join(cache, "snapshots", "0ld"), n_test=4)
    for root in (str(tmp_path), cache):
        task = get_parquet_task("eurosat", root, as_array)
        assert task.info["root"] == os.path.join(cache, "snapshots", "abc123")
        assert len(task.test) == 7 and len(task.train) == 12
        check_pairs(task.test, tol=3)
        # ours, not the dataset's names: EuroSAT's are fixed (OpenAI's wording)
        assert task.classnames[2] == "brushland or shrubland" and task.info["dataset_classnames"] == names
    # a hub cache root (HF_HUB_CACHE's parent) with hub/ inside
    os.rename(str(tmp_path / cache), str(tmp_path / "x"))
    os.makedirs(str(tmp_path / "home" / "hub"))
    os.rename(str(tmp_path / "x"), str(tmp_path / "home" / "hub" / os.path.basename(cache)))
    assert len(get_parquet_task("EuroSAT", str(tmp_path / "home")).test) == 7


def test_hub_cache_refs_main_pointing_nowhere_is_refused(tmp_path):
    cache = write_hub_cache(str(tmp_path), "tanganke/dtd", "abc", lambda s: None)
    with pytest.raises(DatasetLayoutError, match="abc.*incomplete.*hf download tanganke/dtd"):
        get_parquet_task("DTD", str(tmp_path))
    os.remove(os.path.join(cache, "refs", "main"))
    for rev in ("r1", "r2"):
        write_split(os.path.join(cache, "snapshots", rev, "data"), "test", [0, 1], shards=1)
    with pytest.raises(DatasetLayoutError, match="no refs/main and 2 snapshots"):
        get_parquet_task("DTD", str(tmp_path))


# ---------------------------------------------------------------- laziness
def test_images_are_decoded_only_when_indexed(tmp_path, monkeypatch):
    write_split(str(tmp_path / "gtsrb" / "data"), "test", cycle_labels(10, 43))
    opened, reads = [], []
    real_open, real_read = Image.open, pq.ParquetFile.read_row_group
    monkeypatch.setattr(parquet.Image, "open", lambda *a, **k: opened.append(1) or real_open(*a, **k))
    monkeypatch.setattr(pq.ParquetFile, "read_row_group",
                        lambda self, rg, *a, **k: reads.append(rg) or real_read(self, rg, *a, **k))
    task = get_parquet_task("GTSRB", str(tmp_path), as_array)
    assert opened == [] and reads == []          # construction reads labels and footers only
    assert task.test.labels.tolist() == cycle_labels(10, 43)
    task.test[4]
    assert len(opened) == 1 and len(reads) == 1
    task.test[3]                                   # same row group (rows 3..4 of shard 0): no re-read
    assert len(opened) == 2 and len(reads) == 1
    task.test[9]
    assert len(reads) == 2
    # a copy (what a DataLoader worker gets) drops the cached bytes and reads its own
    clone = copy.deepcopy(task.test)
    assert clone._cached is None and red(clone[9][0]) == 5 * task.test[9][1] % 255
    with pytest.raises(IndexError):
        task.test[10]


# ---------------------------------------------------------------- names, class names and templates
def test_fusionbench_names_map_onto_ours():
    assert sorted(HF_SOURCES) == sorted(registry.TALL_20)
    mapped = {name: task_name(name) for name in FUSIONBENCH_TALL20 if name != "emnist_letters"}
    assert sorted(mapped.values()) == sorted(t for t in registry.TALL_20 if t != "EMNIST")
    assert mapped["stanford-cars"] == "Cars" and mapped["oxford-iiit-pet"] == "OxfordIIITPet"
    assert task_name("stanford_cars") == "Cars" and task_name("CarsVal") == "CarsVal"
    # FusionBench's EMNIST is the letters split: another task, refused rather than mapped
    with pytest.raises(DatasetLayoutError, match="letters"):
        task_name("emnist_letters")
    with pytest.raises(DatasetLayoutError, match="unknown task 'ImageNet'"):
        task_name("ImageNet")
    assert all(FUSIONBENCH_TASKS[s.fusionbench] == t for t, s in HF_SOURCES.items())


def write_task(root, task, n=6, names=None, shards=1):
    """A tiny copy of `task`'s dataset where `hf download --local-dir <root>/<repo name>` puts it."""
    src = HF_SOURCES[task]
    folder = os.path.join(root, src.repo.split("/")[1] if src.repo else src.fusionbench,
                          src.config or "data")
    count = parquet.num_classes(task)
    labels = [0, count - 1] + cycle_labels(n - 2, count)
    for split in ("train", src.test_split):
        write_split(folder, split, labels, shards=shards, names=names)
    return labels


@pytest.mark.parametrize("task", registry.TALL_20)
def test_each_task_reads_with_our_class_names_and_templates(tmp_path, task):
    count = parquet.num_classes(task)
    names = [f"name_{i}_x" for i in range(count)] if task in parquet.DATA_NAMED else None
    labels = write_task(str(tmp_path), task, names=names)
    data = get_parquet_task(HF_SOURCES[task].fusionbench, str(tmp_path), as_array)
    assert data.name == task and data.templates == templates.get_templates(task)
    assert data.num_classes == count
    if task in templates.CLASSNAMES:
        assert data.classnames == templates.CLASSNAMES[task]
    elif task in parquet.DATA_NAMED:  # names come from the data, spelled as the dataset spells them
        assert data.classnames[:2] == ["name_0_x", "name_1_x"]
    assert [data.test[i][1] for i in range(len(labels))] == labels
    if task == "FER2013":  # grayscale first, as tall_masks reads it, then RGB
        check_grayscale_pairs(data.test)
    else:
        check_pairs(data.test)


def check_grayscale_pairs(dataset):
    for i in range(len(dataset)):
        img, label = dataset[i]
        colour = Image.open(io.BytesIO(image_bytes(label, i))).convert("RGB")
        assert np.array_equal(img, np.asarray(colour.convert("L").convert("RGB"))), (i, label)
        assert not np.array_equal(img, np.asarray(colour)), "the colour image was not made grayscale"


def test_data_named_task_without_classlabel_names_is_refused(tmp_path):
    write_task(str(tmp_path), "SUN397")
    with pytest.raises(DatasetLayoutError, match="sun397.*no ClassLabel names.*hf download tanganke/sun397"):
        get_parquet_task("SUN397", str(tmp_path))


def test_pcam_boolean_labels(tmp_path):
    write_shard(str(tmp_path / "PatchCamelyon" / "data" / "test-00000-of-00001.parquet"),
                [True, False, True], label_type=pa.bool_())
    data = get_parquet_task("pcam", str(tmp_path), as_array)
    assert data.test.labels.tolist() == [1, 0, 1]
    check_pairs(data.test)


def test_svhn_reads_its_config_folder_only(tmp_path):
    snap = tmp_path / "svhn"
    write_split(str(snap / "cropped_digits"), "test", [1, 2, 3], shards=1)
    write_split(str(snap / "full_numbers"), "test", [7, 7, 7, 7], shards=1)
    assert get_parquet_task("SVHN", str(tmp_path)).test.labels.tolist() == [1, 2, 3]


def test_converted_parquet_layout(tmp_path):
    """The hub's refs/convert/parquet layout: `<config>/<split>/0000.parquet`."""
    write_shard(str(tmp_path / "kmnist" / "default" / "test" / "0000.parquet"), [0, 9, 4])
    write_shard(str(tmp_path / "kmnist" / "default" / "test" / "0001.parquet"), [5], start=3)
    data = get_parquet_task("KMNIST", str(tmp_path), as_array)
    assert data.test.labels.tolist() == [0, 9, 4, 5] and data.train is None
    assert data.classnames == templates.CLASSNAMES["KMNIST"]


# ---------------------------------------------------------------- <Task>Val
def test_val_without_validation_split_is_registry_split(tmp_path):
    labels = cycle_labels(30, 10)
    write_split(str(tmp_path / "mnist" / "mnist"), "train", labels)
    write_split(str(tmp_path / "mnist" / "mnist"), "test", [0, 1], shards=1)
    val = get_parquet_task("MNISTVal", str(tmp_path), as_array)
    train_size, val_size = registry.val_sizes(30)
    assert val.name == "MNISTVal" and len(val.test) == val_size and len(val.train) == train_size
    base = get_parquet_task("MNIST", str(tmp_path), as_array)
    expected = registry.split_train_val(base, "MNISTVal")
    assert list(val.test.indices) == list(expected.test.indices)
    check_pairs(val.test)
    assert val.classnames == base.classnames and val.templates == base.templates


def test_val_uses_the_validation_split_where_present(tmp_path):
    data = tmp_path / "resisc45" / "data"
    write_split(str(data), "train", cycle_labels(20, 45))
    write_split(str(data), "validation", [44, 1, 2], shards=1)
    write_split(str(data), "test", [5, 6], shards=1)
    val = get_parquet_task("RESISC45Val", str(tmp_path), as_array)
    assert val.test.labels.tolist() == [44, 1, 2] and val.info["test_split"] == "validation"
    assert len(val.train) == 20


def test_food101_validation_is_its_test_split(tmp_path):
    """ethz/food101 has train + validation; FusionBench evaluates on validation, so Food101Val holds out
    part of train instead of evaluating on the test images."""
    data = tmp_path / "food101" / "data"
    write_split(str(data), "train", cycle_labels(40, 101), names=[f"f{i}" for i in range(101)])
    write_split(str(data), "validation", [100, 3], shards=1, names=[f"f{i}" for i in range(101)])
    assert get_parquet_task("Food101", str(tmp_path)).test.labels.tolist() == [100, 3]
    val = get_parquet_task("Food101Val", str(tmp_path))
    assert len(val.test) == registry.val_sizes(40)[1] == 4 and len(val.train) == 36


# ---------------------------------------------------------------- refusals
def test_label_out_of_range_names_file_and_value(tmp_path):
    folder = tmp_path / "stl10" / "data"
    write_split(str(folder), "test", [0, 1, 2], shards=1)
    write_shard(str(folder / "test-00001-of-00002.parquet"), [3, 10, 4])
    with pytest.raises(DatasetLayoutError, match=r"test-00001-of-00002\.parquet has label 10.*10 classes"):
        get_parquet_task("STL10", str(tmp_path))
    write_shard(str(folder / "test-00001-of-00002.parquet"), [3, -1, 4])
    with pytest.raises(DatasetLayoutError, match="has label -1"):
        get_parquet_task("STL10", str(tmp_path))


def test_missing_dataset_names_the_download(tmp_path):
    with pytest.raises(DatasetLayoutError) as e:
        get_parquet_task("Cars", str(tmp_path))
    msg = str(e.value)
    assert "Cars" in msg and str(tmp_path) in msg
    assert "hf download tanganke/stanford_cars --repo-type dataset --local-dir" in msg
    with pytest.raises(DatasetLayoutError, match="no hub copy of EMNIST"):
        get_parquet_task("EMNIST", str(tmp_path))


def test_folder_of_other_datasets_is_not_read_as_the_missing_one(tmp_path):
    """A data folder holding mnist/ but not stanford_cars/: Cars is missing, MNIST's shards (labels
    0..9, all valid Cars labels) must not be read in its place."""
    write_split(str(tmp_path / "mnist" / "mnist"), "test", [1, 2], shards=1)
    with pytest.raises(DatasetLayoutError, match="Cars: no parquet dataset found.*hf download"):
        get_parquet_task("Cars", str(tmp_path))


def test_labels_that_are_not_class_ids_are_refused(tmp_path):
    write_shard(str(tmp_path / "kmnist" / "data" / "test-00000-of-00001.parquet"), ["a", "b"],
                label_type=pa.string())
    with pytest.raises(DatasetLayoutError, match="labels of type string, expected integer class ids 0..9"):
        get_parquet_task("KMNIST", str(tmp_path))
    write_shard(str(tmp_path / "kmnist" / "data" / "test-00000-of-00001.parquet"), [1, None])
    with pytest.raises(DatasetLayoutError, match="test-00000-of-00001.parquet has 1 rows without a label"):
        get_parquet_task("KMNIST", str(tmp_path))


def test_missing_split_names_folder_and_fix(tmp_path):
    write_split(str(tmp_path / "dtd" / "data"), "train", cycle_labels(20, 47))
    with pytest.raises(DatasetLayoutError, match=r"no 'test' split in .*dtd.*found train.*hf download"):
        get_parquet_task("DTD", str(tmp_path))
    # DTDVal needs only train; a base task without train reads its test split alone
    assert len(get_parquet_task("DTDVal", str(tmp_path)).test) == 2
    write_split(str(tmp_path / "cifar10" / "data"), "test", [1, 2], shards=1)
    with pytest.raises(DatasetLayoutError, match="no 'train' split"):
        get_parquet_task("CIFAR10Val", str(tmp_path))


def test_missing_column_is_refused(tmp_path):
    path = tmp_path / "cifar10" / "data" / "test-00000-of-00001.parquet"
    os.makedirs(path.parent)
    pq.write_table(pa.table({"image": pa.array([b"x"]), "target": pa.array([1])}), str(path))
    with pytest.raises(DatasetLayoutError,
                       match=r"test-00000-of-00001\.parquet has no label column.*target.*hf download"):
        get_parquet_task("CIFAR10", str(tmp_path))


def test_classlabel_count_mismatch_is_refused(tmp_path):
    write_split(str(tmp_path / "cifar100" / "data"), "test", [0, 1], names=["a", "b", "c"])
    with pytest.raises(DatasetLayoutError, match="names 3 classes, CIFAR100 has 100"):
        get_parquet_task("CIFAR100", str(tmp_path))


def test_two_configs_for_one_split_are_ambiguous(tmp_path):
    write_split(str(tmp_path / "kmnist" / "a"), "test", [1], shards=1)
    write_split(str(tmp_path / "kmnist" / "b"), "test", [2], shards=1)
    with pytest.raises(DatasetLayoutError, match="'test' has shards in 2 folders"):
        get_parquet_task("KMNIST", str(tmp_path))


def test_bad_image_cells_name_the_file(tmp_path):
    path = str(tmp_path / "kmnist" / "data" / "test-00000-of-00001.parquet")
    write_shard(path, [1, 2], images=[{"bytes": None, "path": "/elsewhere/1.png"},
                                      {"bytes": b"not an image", "path": "2.png"}])
    data = get_parquet_task("KMNIST", str(tmp_path))
    with pytest.raises(DatasetLayoutError, match=r"row 0 of .*test-00000.*no image bytes.*/elsewhere/1\.png"):
        data.test[0]
    with pytest.raises(DatasetLayoutError, match=r"cannot decode the image in row 1 of .*test-00000"):
        data.test[1]


def test_not_parquet_is_refused(tmp_path):
    path = tmp_path / "kmnist" / "data" / "test-00000-of-00001.parquet"
    os.makedirs(path.parent)
    path.write_bytes(b"not parquet")
    with pytest.raises(DatasetLayoutError,
                       match="cannot read parquet file .*test-00000.*hf download tanganke/kmnist"):
        get_parquet_task("KMNIST", str(tmp_path))


def test_classlabel_names_in_another_order_are_refused(tmp_path):
    names = list(templates.CLASSNAMES["CIFAR10"])
    names[0], names[3] = names[3], names[0]  # the dataset's label 0 is our "cat"
    write_task(str(tmp_path), "CIFAR10", names=names)
    with pytest.raises(DatasetLayoutError, match="its label 0 is 'cat', which is our class 3"):
        get_parquet_task("CIFAR10", str(tmp_path))


def test_classlabel_names_worded_differently_are_ours_in_the_same_order(tmp_path):
    # EuroSAT's hub names are its folder names; ours are OpenAI's wording of the same classes
    write_task(str(tmp_path), "EuroSAT", names=list(templates.EUROSAT_FOLDERS))
    data = get_parquet_task("EuroSAT", str(tmp_path))
    assert data.classnames[0] == "annual crop land" and data.info["dataset_classnames"][0] == "AnnualCrop"
    write_task(str(tmp_path / "case"), "CIFAR10", names=[n.upper() for n in templates.CLASSNAMES["CIFAR10"]])
    assert get_parquet_task("CIFAR10", str(tmp_path / "case")).classnames == templates.CLASSNAMES["CIFAR10"]


def test_fer2013_as_tall_masks_reads_it(tmp_path):
    from tall_trees import make_fer2013
    written = make_fer2013(str(tmp_path))
    data = get_parquet_task("FER2013", str(tmp_path), as_array)
    assert data.classnames == templates.CLASSNAMES["FER2013"] and data.info["repo"] == "Jeneral/fer-2013"
    assert data.test.labels.tolist() == written["test"]
    check_pairs(data.test)


def test_the_download_hint_names_the_dataset_folder_once(tmp_path):
    from taskmerge.datasets.parquet import download_hint
    root = str(tmp_path / "data")
    want = f"--local-dir {os.path.join(root, 'eurosat')}"
    for where in (root, os.path.join(root, "eurosat"), os.path.join(root, "eurosat", "data")):
        assert download_hint("EuroSAT", where).endswith(want), where
    cache = os.path.join(root, "hub", "datasets--tanganke--eurosat", "snapshots", "abc", "data")
    assert download_hint("EuroSAT", cache).endswith(want)
