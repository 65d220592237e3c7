"""`data_format`: the real tasks read as the Hugging Face parquet snapshots through runs/setup.task_data,
the originals' folders by default; the embedded benchmark ignores it."""
from __future__ import annotations

import types

import pytest
from test_datasets_parquet import check_pairs, write_task

from taskmerge.datasets.parquet import HF_SOURCES, ParquetImageDataset
from taskmerge.datasets.real import DatasetLayoutError
from taskmerge.runs import setup as run_setup
from taskmerge.storage.checkpoints import CheckpointSet
from taskmerge.storage.errors import ConfigError


def real_setup(tmp_path, data_format, tasks=("MNIST", "KMNIST")):
    ckpt = CheckpointSet(str(tmp_path / "ckpt"), "ViT-B-32", tuple(tasks), "fusionbench", "unused")
    setup = run_setup.Setup("ViT-B-32", "ViT-B-32", ckpt, list(tasks), str(tmp_path / "data"), False,
                            data_format=data_format)
    # task_data needs only the encoder's input size: a stand-in spares building a real ViT-B/32.
    setup._encoder_cache["encoder"] = types.SimpleNamespace(image_size=8)
    return setup


def test_parquet_tasks_read_through_task_data(tmp_path):
    labels = write_task(str(tmp_path / "data"), "KMNIST", n=12)
    setup = real_setup(tmp_path, "parquet")
    data = run_setup.task_data(setup, "KMNIST")
    assert isinstance(data.test, ParquetImageDataset) and data.info["format"] == "parquet"
    assert [data.test[i][1] for i in range(len(labels))] == labels
    image, _ = data.test[0]
    assert tuple(image.shape) == (3, 8, 8)  # the encoder's eval transform was applied
    val = run_setup.task_data(setup, "KMNIST", split="val")
    assert val.name == "KMNISTVal" and len(val.test) >= 1
    assert setup.describe()["data_format"] == "parquet"


def test_folders_is_the_default_and_does_not_read_parquet(tmp_path):
    write_task(str(tmp_path / "data"), "MNIST")
    setup = real_setup(tmp_path, "folders")
    with pytest.raises(DatasetLayoutError):  # a parquet snapshot is not the originals' MNIST folder
        run_setup.task_data(setup, "MNIST")
    assert run_setup.Setup.__dataclass_fields__["data_format"].default == "folders"


def test_resolve_setup_checks_the_format_and_its_tasks(tmp_path):
    with pytest.raises(ConfigError, match="data_format='arrow'"):
        run_setup.resolve_setup("ViT-B-32", str(tmp_path), str(tmp_path), ["MNIST"], "arrow")
    with pytest.raises(ConfigError, match="'Omniglot'"):  # not one of the 20 tasks
        run_setup.resolve_setup("ViT-B-32", str(tmp_path), str(tmp_path), ["Omniglot"], "folders")
    assert "KMNIST" in HF_SOURCES
