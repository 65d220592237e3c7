"""Data that is not what its reader expects ends in one DatasetLayoutError naming the file and the
fix, never in a traceback or a silent result (issue #21 §1, §2): parquet shards with a corrupt data
page, class names in another order in a later shard, names that match none of ours, an empty test
split, a train split too small for `<Task>Val`; PCAM stored as floats; SUN397 folders without their
letter prefix."""
from __future__ import annotations

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_datasets_parquet import as_array, cycle_labels, write_shard, write_split, write_task

from taskmerge.datasets import DatasetLayoutError, get_task, templates
from taskmerge.datasets.fusionbench_classnames import CLASSNAMES as FB_CLASSNAMES
from taskmerge.datasets.fusionbench_classnames import check_label_order as check_fusionbench_order
from taskmerge.datasets.parquet import get_parquet_task


def _corrupt_image_chunk(path: str, row_group: int) -> None:
    """Scramble the image column's pages of one row group (its page headers stay readable)."""
    chunk = pq.ParquetFile(path).metadata.row_group(row_group).column(0)
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    data = bytearray(open(path, "rb").read())
    for k in range(start + 20, start + chunk.total_compressed_size - 5):
        data[k] ^= 0x5A
    with open(path, "wb") as f:
        f.write(bytes(data))


def test_a_corrupt_data_page_names_the_file_and_row_group(tmp_path):
    path = str(tmp_path / "mnist" / "test-00000-of-00001.parquet")
    write_shard(path, cycle_labels(6, 10), row_group_size=3)
    write_shard(str(tmp_path / "mnist" / "train-00000-of-00001.parquet"), cycle_labels(6, 10))
    _corrupt_image_chunk(path, 1)
    data = get_parquet_task("MNIST", str(tmp_path), as_array)
    data.test[0]  # row group 0 is intact
    with pytest.raises(DatasetLayoutError, match=r"cannot read row group 1 of parquet file .*test-00000"
                                                  r"-of-00001\.parquet .*corrupt.*hf download ylecun/mnist"):
        data.test[4]


def test_a_corrupt_label_page_names_the_file(tmp_path):
    path = str(tmp_path / "mnist" / "test-00000-of-00001.parquet")
    write_shard(path, cycle_labels(6, 10), row_group_size=6)
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(2)  # image.bytes, image.path, label
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
    data = bytearray(open(path, "rb").read())
    for k in range(start, start + chunk.total_compressed_size):
        data[k] = 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(DatasetLayoutError, match=r"cannot read the 'label' column of parquet file "
                                                  r".*test-00000-of-00001\.parquet"):
        get_parquet_task("MNIST", str(tmp_path), as_array)


def test_a_second_shard_with_another_class_order_is_refused(tmp_path):
    """Fixed names (CIFAR10) and names from the data (CIFAR100): every shard is read, not the first."""
    names = list(templates.CLASSNAMES["CIFAR10"])
    folder = tmp_path / "cifar10" / "data"
    write_shard(str(folder / "test-00000-of-00002.parquet"), [0, 1], names=names)
    swapped = names[:]
    swapped[0], swapped[2] = swapped[2], swapped[0]
    write_shard(str(folder / "test-00001-of-00002.parquet"), [2, 3], names=swapped)
    with pytest.raises(DatasetLayoutError, match=r"test-00001-of-00002\.parquet numbers its classes in "
                                                  r"another order than ours: its label 0 is 'bird'"):
        get_parquet_task("CIFAR10", str(tmp_path))

    fine = [f"class_{i}" for i in range(100)]
    other = fine[:]
    other[5], other[7] = other[7], other[5]
    folder = tmp_path / "cifar100" / "data"
    write_shard(str(folder / "test-00000-of-00001.parquet"), [0, 1], names=fine)
    write_shard(str(folder / "train-00000-of-00001.parquet"), [0, 1], names=other)
    with pytest.raises(DatasetLayoutError, match=r"train-00000-of-00001\.parquet names its label 5 "
                                                  r"'class_7' and .*test-00000-of-00001\.parquet names "
                                                  r"it 'class_5'"):
        get_parquet_task("CIFAR100", str(tmp_path))


def test_names_that_match_none_of_ours_are_refused_unless_trusted(tmp_path):
    """EuroSAT in folder-style names with classes 0 and 2 swapped, one name reworded: the reworded
    name no longer counts as being in its place."""
    names = list(templates.EUROSAT_FOLDERS)
    names[0] = "Crops"  # matches none of our spellings
    write_task(str(tmp_path), "EuroSAT", names=names)
    with pytest.raises(DatasetLayoutError, match=r"names its label 0 'Crops', which is none of our "
                                                  r"EuroSAT class names .*trust_label_order=True"):
        get_parquet_task("EuroSAT", str(tmp_path))
    data = get_parquet_task("EuroSAT", str(tmp_path), trust_label_order=True)
    assert data.classnames[0] == "annual crop land"
    # a known name at another index is refused whatever the user trusts
    names[0], names[2] = "HerbaceousVegetation", "Crops"
    write_task(str(tmp_path / "swapped"), "EuroSAT", names=names)
    with pytest.raises(DatasetLayoutError, match="its label 0 is 'HerbaceousVegetation', which is our class 2"):
        get_parquet_task("EuroSAT", str(tmp_path / "swapped"), trust_label_order=True)


def test_hub_spellings_of_fixed_names_are_matched(tmp_path):
    """FusionBench's names (KMNIST in hiragana) and FER2013's own names are spellings of ours."""
    write_task(str(tmp_path), "KMNIST", names=FB_CLASSNAMES["KMNIST"])
    assert get_parquet_task("KMNIST", str(tmp_path)).classnames == templates.CLASSNAMES["KMNIST"]
    write_task(str(tmp_path), "FER2013", names=templates.FER2013_NAMES)
    assert get_parquet_task("FER2013", str(tmp_path)).classnames == templates.CLASSNAMES["FER2013"]
    # class ids as names (GTSRB's folders are its ids): a number is that class
    ids = [str(i) for i in range(43)]
    write_task(str(tmp_path), "GTSRB", names=ids)
    assert get_parquet_task("GTSRB", str(tmp_path)).classnames == templates.CLASSNAMES["GTSRB"]
    ids[3], ids[4] = ids[4], ids[3]
    write_task(str(tmp_path / "swapped"), "GTSRB", names=ids)
    with pytest.raises(DatasetLayoutError, match="its label 3 is '4', which is our class 4"):
        get_parquet_task("GTSRB", str(tmp_path / "swapped"), trust_label_order=True)


def test_fusionbench_order_check_refuses_unmatched_names_unless_trusted():
    names = list(FB_CLASSNAMES["SUN397"])
    names[1] = "bey"  # a SUN397 folder name cut two letters too short
    with pytest.raises(DatasetLayoutError, match=r"names its class 1 'bey', which is none of FusionBench's"):
        check_fusionbench_order("SUN397", names, "the SUN397 data")
    check_fusionbench_order("SUN397", names, "the SUN397 data", trust_label_order=True)
    # CIFAR100's data says "crab" where FusionBench's list has its typo "cra"; our fixed names pass
    cifar = list(FB_CLASSNAMES["CIFAR100"])
    cifar[26] = "crab"
    check_fusionbench_order("CIFAR100", cifar, "the CIFAR100 data")
    check_fusionbench_order("KMNIST", templates.CLASSNAMES["KMNIST"], "the KMNIST data")
    check_fusionbench_order("FER2013", templates.CLASSNAMES["FER2013"], "the FER2013 data")


def test_an_empty_test_split_is_refused(tmp_path):
    write_split(str(tmp_path / "mnist"), "train", cycle_labels(20, 10), shards=1)
    write_shard(str(tmp_path / "mnist" / "test-00000-of-00001.parquet"), [])
    with pytest.raises(DatasetLayoutError, match=r"MNIST: the 'test' split \(.*test-00000-of-00001"
                                                  r"\.parquet\) has no rows.*hf download ylecun/mnist"):
        get_parquet_task("MNIST", str(tmp_path))


def test_a_train_split_too_small_for_val_is_refused(tmp_path):
    write_split(str(tmp_path / "mnist"), "train", cycle_labels(5, 10), shards=1)
    write_split(str(tmp_path / "mnist"), "test", cycle_labels(5, 10), shards=1)
    with pytest.raises(DatasetLayoutError, match=r"MNISTVal: the train split under .*mnist has 5 "
                                                  r"samples, too few for a 10% validation split"):
        get_parquet_task("MNISTVal", str(tmp_path))


def test_pcam_stored_as_floats_is_refused(tmp_path):
    h5py = pytest.importorskip("h5py")
    from tall_trees import make_pcam
    make_pcam(str(tmp_path))
    stem = tmp_path / "PCAM" / "pcam" / "camelyonpatch_level_2_split_test_x.h5"
    with h5py.File(stem, "r") as f:
        x = np.asarray(f["x"])
    with h5py.File(stem, "w") as f:
        f["x"] = x.astype(np.float32) / 255
    data = get_task("PCAM", str(tmp_path), None)
    with pytest.raises(DatasetLayoutError, match=r"(?s)'x' is stored as float32; PCAM's files hold "
                                                  r"uint8.*looked at: .*split_test_x\.h5"):
        len(data.test)


def _sun397(root, folders):
    from test_datasets_real import write_image
    for split in ("train", "test"):
        for i, folder in enumerate(folders):
            write_image(os.path.join(root, "sun397", split, folder, "0.jpg"), i, 10)


def test_sun397_folders_without_the_letter_prefix_keep_their_names(tmp_path):
    from taskmerge.datasets.real import SUN397_CLASS_COUNT
    named = [f"{c}{i:03d}" for i, c in enumerate("abcdefghijklmnopqrstuvwxyz" * 16)][:SUN397_CLASS_COUNT]
    named[0] = "abbey"
    _sun397(str(tmp_path / "bare"), sorted(named))
    data = get_task("SUN397", str(tmp_path / "bare"), None)
    assert "abbey" in data.classnames and "bey" not in data.classnames
    prefixed = sorted(f"{n[0]}_{n}" for n in named)
    _sun397(str(tmp_path / "prefixed"), prefixed)
    assert get_task("SUN397", str(tmp_path / "prefixed"), None).classnames == data.classnames
    mixed = prefixed[:-1] + [named[-1]]
    _sun397(str(tmp_path / "mixed"), mixed)
    with pytest.raises(DatasetLayoutError, match="carry SUN397's letter prefix .* do not"):
        get_task("SUN397", str(tmp_path / "mixed"), None)
