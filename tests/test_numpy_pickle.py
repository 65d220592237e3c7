"""The restricted numpy unpickler: CIFAR's python batches and tall_masks' `np.save`d mask dicts are
read as plain data (numpy arrays, dicts, lists, numbers, strings); every other global is refused."""
import io
import os
import pickle

import numpy as np
import pytest

from taskmerge.storage.safe_pickle import CheckpointError, load_npy, load_numpy_pickle


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_arrays_and_containers_round_trip(protocol):
    data = {"data": np.arange(24, dtype=np.uint8).reshape(2, 12), "labels": [3, 1],
            "names": ["apple", "aquarium_fish"], "big_endian": np.arange(6, dtype=">f8").reshape(2, 3),
            "fortran": np.asfortranarray(np.arange(6, dtype=np.int32).reshape(2, 3)),
            "scalar": np.float32(2.5), "bools": np.array([True, False])}
    out = load_numpy_pickle(io.BytesIO(pickle.dumps(data, protocol=protocol)), "batch")
    assert set(out) == set(data) and out["labels"] == [3, 1] and out["names"] == data["names"]
    for key in ("data", "big_endian", "fortran", "bools"):
        assert out[key].dtype == data[key].dtype and np.array_equal(out[key], data[key])
    assert out["scalar"] == np.float32(2.5)


def test_python2_style_latin1_pickle():
    # protocol 2 as Python 2's cPickle wrote CIFAR: read with encoding="latin1", like torchvision
    data = {b"data": np.frombuffer(bytes(range(256)), dtype=np.uint8).reshape(4, 64), b"labels": [0, 9]}
    out = load_numpy_pickle(io.BytesIO(pickle.dumps(data, protocol=2)), "b", encoding="latin1")
    assert np.array_equal(out[b"data"], data[b"data"])


def test_npy_of_a_dict_of_packbits_arrays(tmp_path):
    masks = {"Cars": np.packbits(np.array([1, 0, 1], bool)), "DTD": np.packbits(np.ones(9, bool))}
    np.save(tmp_path / "m.npy", masks)
    loaded = load_npy(str(tmp_path / "m.npy"))
    assert loaded.shape == () and loaded.dtype == object
    assert {k: v.tolist() for k, v in loaded.item().items()} == {"Cars": [160], "DTD": [255, 128]}
    np.save(tmp_path / "plain.npy", np.arange(5))
    assert load_npy(str(tmp_path / "plain.npy")).tolist() == [0, 1, 2, 3, 4]


class _Evil:
    def __reduce__(self):
        return os.system, ("echo pwned",)


class _EvilArray:  # a numpy global that is not a plain ndarray constructor
    def __reduce__(self):
        return np.load, ("x",)


@pytest.mark.parametrize("payload,refused", [
    ({"mask": _Evil()}, "system"),
    ([np.arange(3), _EvilArray()], "numpy.load"),
    (np.zeros(2, dtype=[("a", "O"), ("b", "i4")]), "dtype"),        # structured dtype
    (np.ma.masked_array([1, 2], mask=[0, 1]), "numpy.ma"),         # an ndarray subclass
])
def test_anything_else_is_refused(payload, refused, tmp_path):
    with pytest.raises(CheckpointError, match=refused):
        load_numpy_pickle(io.BytesIO(pickle.dumps(payload, protocol=2)), "evil.pkl")
    # the same payload behind an .npy object-array header
    path = tmp_path / "evil.npy"
    holder = np.empty((), dtype=object)
    holder[()] = payload
    np.save(path, holder, allow_pickle=True)
    with pytest.raises(CheckpointError, match=refused):
        load_npy(str(path))


def test_truncated_pickle_names_the_file():
    raw = pickle.dumps({"data": np.arange(100, dtype=np.uint8)}, protocol=2)
    with pytest.raises(CheckpointError, match="cut.pkl"):
        load_numpy_pickle(io.BytesIO(raw[:-20]), "cut.pkl")
