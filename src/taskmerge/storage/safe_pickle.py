"""Reading pickled checkpoints without running any code from them (METHODS.md §4.1).

The task_vectors checkpoints are whole pickled `nn.Module`s written by open_clip 2.0.2 and old
PyTorch; `torch.load(weights_only=True)` refuses them and `weights_only=False` (or `pickle.load`)
would run whatever the file names. This module reads them with a restricted unpickler instead:

* every global the pickle names goes through `find_class`, which never imports anything;
* the few callables a checkpoint needs (tensor rebuilders, `OrderedDict`, `set`, `torch.Size`, …)
  map to small implementations here that only build tensors and containers;
* every allowed class (`src.modeling.ImageEncoder`, open_clip's `CLIP`, `torch.nn` layers,
  torchvision transforms, …, see `ALLOWED_CLASSES`) maps to an inert `StandIn` that just records
  the pickled `__dict__`; the real class is never touched, so none of its code runs;
* anything else is refused with a `CheckpointError` naming the file and the global.

`module_state_dict` then walks the stand-ins' `_parameters` / `_buffers` / `_modules` exactly as
`nn.Module.state_dict` would. Three container formats are read: torch's zip format (torch.save
since 1.6), the legacy stream format (magic number, protocol, sys_info, pickle, storage keys, raw
storages) and a plain `pickle.dump` of the module (the ViT-B-16/Cars "Invalid magic number"
file, task_vectors#11), whose storages are legacy-format byte strings passed to
`torch.storage._load_from_bytes`, read here by the same restricted loader.
"""
from __future__ import annotations

import _compat_pickle
import collections
import io
import pickle
import re
import struct
import sys
import zipfile
import zlib
from typing import Any, BinaryIO

import numpy as np
import torch

from taskmerge.storage.errors import InputError


class CheckpointError(InputError):
    """A checkpoint that cannot be read: names the file, what is wrong and how to fix it."""


# Classes a task_vectors / tall_masks checkpoint may pickle. They become inert stand-ins, so
# adding a plain data class here is safe; never add functions that act (see _DANGEROUS_MODULES).
ALLOWED_CLASSES: dict[str, frozenset[str]] = {m: frozenset(names) for m, names in {
    # task_vectors (src/modeling.py) and tall_masks (src/models/modeling.py)
    "src.modeling": ["ImageEncoder", "ClassificationHead", "ImageClassifier",
                     "MultiHeadImageClassifier"],
    "src.models.modeling": ["ImageEncoder", "ClassificationHead", "ImageClassifier",
                            "MultiHeadImageClassifier"],
    # open_clip 2.0.2 (everything lived in open_clip.model) and 3.x (open_clip.transformer)
    "open_clip.model": ["CLIP", "CustomTextCLIP", "VisualTransformer", "VisionTransformer",
                        "TextTransformer", "Transformer", "ResidualAttentionBlock", "LayerNorm",
                        "LayerNormFp32", "QuickGELU", "Attention", "AttentionalPooler",
                        "LayerScale", "PatchDropout", "ModifiedResNet", "AttentionPool2d",
                        "Bottleneck"],
    "open_clip.transformer": ["VisionTransformer", "TextTransformer", "Transformer",
                              "ResidualAttentionBlock", "CustomResidualAttentionBlock",
                              "LayerNorm", "LayerNormFp32", "QuickGELU", "Attention",
                              "AttentionalPooler", "LayerScale", "PatchDropout"],
    "open_clip.modified_resnet": ["ModifiedResNet", "AttentionPool2d", "Bottleneck"],
    "open_clip.transform": ["_convert_to_rgb", "ResizeMaxSize", "ResizeKeepRatio",
                            "CenterCropOrPad", "MaybeConvertMode", "MaybeToTensor"],
    # torch.nn layers
    "torch.nn.modules.linear": ["Linear", "NonDynamicallyQuantizableLinear", "_LinearWithBias",
                                "Identity"],
    "torch.nn.modules.activation": ["MultiheadAttention", "GELU", "ReLU", "SiLU", "Tanh",
                                    "Sigmoid", "Softmax"],
    "torch.nn.modules.conv": ["Conv1d", "Conv2d"],
    "torch.nn.modules.container": ["Sequential", "ModuleList", "ModuleDict", "ParameterList",
                                   "ParameterDict"],
    "torch.nn.modules.normalization": ["LayerNorm", "GroupNorm"],
    "torch.nn.modules.batchnorm": ["BatchNorm1d", "BatchNorm2d"],
    "torch.nn.modules.pooling": ["AvgPool2d", "MaxPool2d", "AdaptiveAvgPool2d"],
    "torch.nn.modules.dropout": ["Dropout"],
    "torch.nn.modules.sparse": ["Embedding"],
    # the pickled train_preprocess / val_preprocess
    "torchvision.transforms.transforms": ["Compose", "Resize", "CenterCrop", "ToTensor",
                                          "Normalize", "RandomResizedCrop", "ConvertImageDtype"],
    "torchvision.transforms.functional": ["InterpolationMode"],
}.items()}

# Only used to word the refusal: these globals are code-execution primitives, not data classes.
_DANGEROUS_MODULES = ("builtins", "os", "posix", "nt", "subprocess", "sys", "importlib", "runpy",
                      "shutil", "socket", "pty", "code", "ctypes", "pickle", "marshal", "types",
                      "operator", "functools", "webbrowser", "multiprocessing", "torch._C",
                      "torch.ops", "pdb", "timeit", "asyncio")

# Buffers that the real modules register with persistent=False, dropped even when an old pickle
# lacks `_non_persistent_buffers_set`: open_clip's text causal mask (non-persistent in 2.0.2,
# METHODS.md §1.1).
NON_PERSISTENT_BUFFERS: dict[str, frozenset[str]] = {
    "open_clip.model.CLIP": frozenset({"attn_mask"}),
    "open_clip.model.CustomTextCLIP": frozenset({"attn_mask"}),
    "open_clip.transformer.TextTransformer": frozenset({"attn_mask"}),
    "open_clip.model.TextTransformer": frozenset({"attn_mask"}),
}

MAGIC_NUMBER = 0x1950A86A20F9469CFC6C  # torch's legacy-format magic
LEGACY_PROTOCOL_VERSION = 1001
_MAX_NESTING = 4


# --- stand-ins -------------------------------------------------------------------------------

class StandIn:
    """Inert record of a pickled object whose class is allowed: pickled state lands in __dict__."""
    stand_in_of = "?"

    def __new__(cls, *args, **kwargs):
        obj = object.__new__(cls)
        if args or kwargs:  # e.g. an Enum member rebuilt as InterpolationMode('bicubic')
            obj.__dict__["_stand_in_args"] = (args, kwargs)
        return obj

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        slots = None
        if isinstance(state, tuple) and len(state) == 2:
            state, slots = state
        if isinstance(state, dict):
            self.__dict__.update(state)
        elif state is not None:
            self.__dict__["_stand_in_state"] = state
        if isinstance(slots, dict):
            self.__dict__.update(slots)

    def __repr__(self):
        return f"<stand-in for {self.stand_in_of}>"


_stand_in_classes: dict[str, type] = {}


def _stand_in(qualified: str) -> type:
    if qualified not in _stand_in_classes:
        name = qualified.rsplit(".", 1)[-1]
        _stand_in_classes[qualified] = type(name, (StandIn,), {"stand_in_of": qualified})
    return _stand_in_classes[qualified]


def is_stand_in(obj: Any) -> bool:
    return isinstance(obj, StandIn)


def stand_in_name(obj: Any) -> str:
    """`module.Class` of the pickled object a stand-in replaces."""
    return type(obj).stand_in_of


# --- storages and tensors ----------------------------------------------------------------------

class _StorageType:
    """What `torch.FloatStorage` etc. resolve to: only a dtype, never called."""

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool, "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128, "UntypedStorage": torch.uint8,
}


class _Storage:
    """A storage of the file: `nbytes` bytes of `data` (uint8, CPU) from `offset`, typed `dtype`.

    `name` is the file's key of the storage, for error messages. A storage always lies inside
    `data`: torch's `set_` would silently grow `data` for a view reaching past it (the tensor
    would then read memory that is not in the file)."""

    def __init__(self, data: torch.Tensor, dtype: torch.dtype, name: str, offset: int = 0,
                 nbytes: int | None = None):
        self.data, self.dtype, self.name, self.offset = data, dtype, name, offset
        self.nbytes = data.numel() - offset if nbytes is None else nbytes
        if offset < 0 or self.nbytes < 0 or offset + self.nbytes > data.numel():
            raise CheckpointError(f"storage {name!r}: a view of bytes [{offset}, "
                                  f"{offset + self.nbytes}) reaches outside its storage of "
                                  f"{data.numel()} bytes; the file is corrupt")


def _byteswap(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    size = torch.empty((), dtype=dtype).element_size()
    return raw if size == 1 else raw.view(-1, size).flip(1).reshape(-1)


def _bytes_tensor(raw: bytes) -> torch.Tensor:
    if not raw:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def _make_tensor(storage, storage_offset, size, stride, dtype=None) -> torch.Tensor:
    if not isinstance(storage, _Storage):
        raise CheckpointError(f"a tensor was rebuilt from {type(storage).__name__}, not a storage")
    dtype = storage.dtype if dtype is None else dtype
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    esize = torch.empty((), dtype=dtype).element_size()
    if (len(size) != len(stride) or storage_offset < 0 or min(size + stride, default=0) < 0
            or storage.offset % esize):
        raise CheckpointError(f"invalid tensor geometry size={size} stride={stride} "
                              f"offset={storage_offset} in storage {storage.name!r}; the file is "
                              f"corrupt")
    if all(size):  # the last element it reaches must lie inside the storage
        last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
        if (last + 1) * esize > storage.nbytes:
            raise CheckpointError(f"tensor of size {size} reaches past its storage "
                                  f"{storage.name!r} ({storage.nbytes} bytes); the file is "
                                  f"corrupt")
    t = torch.empty(0, dtype=dtype)
    offset = storage.offset // esize + storage_offset
    return t.set_(storage.data.untyped_storage(), offset, size, stride)


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _make_tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       metadata=None):
    t = _make_tensor(storage, storage_offset, size, stride)
    if metadata:  # conj / neg bits
        torch._utils.set_tensor_metadata(t, dict(metadata))
    return t


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None):
    if not isinstance(dtype, torch.dtype):
        raise CheckpointError(f"tensor dtype {dtype!r} is not a torch.dtype")
    t = _make_tensor(storage, storage_offset, size, stride, dtype)
    if metadata:
        torch._utils.set_tensor_metadata(t, dict(metadata))
    return t


def _tensor_only(data, *rest):
    """Parameters come back as plain tensors: a state dict holds data, not autograd leaves."""
    if not isinstance(data, torch.Tensor):
        raise CheckpointError(f"a parameter was rebuilt from {type(data).__name__}, not a tensor")
    return data


_REBUILDERS = (_rebuild_tensor, _rebuild_tensor_v2, _rebuild_tensor_v3, _tensor_only)


def _rebuild_from_type_v2(func, new_type, args, state):
    if func not in _REBUILDERS:
        raise CheckpointError(f"_rebuild_from_type_v2 called with {func!r}")
    return func(*args)


class _TensorType:
    """`torch.Tensor` / `torch.nn.Parameter` as the `new_type` argument of a tensor subclass."""

    def __call__(self, data=None, requires_grad=True):
        return _tensor_only(data)


def _encode(text, encoding="utf-8", errors="strict"):
    # Protocol-2 pickles spell bytes as _codecs.encode(str, 'latin1'); allow exactly that.
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1") or errors != "strict":
        raise CheckpointError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not allowed")
    return text.encode("latin1")


def _reconstructor(cls, base, state):
    # copyreg._reconstructor (protocol 0/1): only ever builds a stand-in.
    if not (isinstance(cls, type) and issubclass(cls, StandIn)):
        raise CheckpointError(f"copyreg._reconstructor called for {cls!r}")
    obj = cls.__new__(cls)
    if state is not None:
        obj.__dict__["_stand_in_state"] = state
    return obj


def _safe_globals() -> dict[tuple[str, str], Any]:
    table: dict[tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
        ("torch._utils", "_rebuild_parameter"): _tensor_only,
        ("torch._utils", "_rebuild_parameter_with_state"): _tensor_only,
        ("torch._tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("torch.tensor", "_rebuild_from_type_v2"): _rebuild_from_type_v2,
        ("torch.nn.parameter", "Parameter"): _TensorType(),
        ("torch", "Tensor"): _TensorType(),
        ("torch._tensor", "Tensor"): _TensorType(),
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "object"): object,
        ("copyreg", "_reconstructor"): _reconstructor,
        ("_codecs", "encode"): _encode,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
    }
    for name in dir(torch):
        if isinstance(getattr(torch, name), torch.dtype):
            table[("torch", name)] = getattr(torch, name)
    for name, dtype in _STORAGE_DTYPES.items():
        table[("torch", name)] = table[("torch.cuda", name)] = _StorageType(dtype)
    return table


_SAFE_GLOBALS = _safe_globals()
# _load_from_bytes is added per load (it recurses with the same source name).


def _refusal(source: str, qualified: str) -> CheckpointError:
    module = qualified.rsplit(".", 1)[0]
    if module.split(".")[0] in _DANGEROUS_MODULES or module in _DANGEROUS_MODULES:
        fix = ("this global can run code: the file is malicious or not a checkpoint; do not add "
               "it to the allow-list")
    else:
        fix = ("if it is a plain data class, add it to ALLOWED_CLASSES in "
               "src/taskmerge/storage/safe_pickle.py (it is then loaded as an inert stand-in); "
               "otherwise, on a machine where you trust the file and have its code, re-save it as a state "
               "dict (torch.save(module.state_dict(), path)) and convert that with "
               "src/convert_checkpoints.py")
    return CheckpointError(f"{source}: refusing to unpickle {qualified}: it is not on taskmerge's "
                           f"allow-list and could run code from the file; {fix}")


# --- the unpickler -----------------------------------------------------------------------------

class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: BinaryIO, source: str, storages=None, depth: int = 0):
        super().__init__(file)
        self.source, self.storages, self.depth = source, storages, depth

    def find_class(self, module: str, name: str):
        # Python-2 names (protocol 2 writes __builtin__.set, copy_reg._reconstructor); mapped here
        # because we never call pickle's own find_class, which would import the module.
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return self._load_from_bytes
        if (module, name) in _SAFE_GLOBALS:
            return _SAFE_GLOBALS[(module, name)]
        if name in ALLOWED_CLASSES.get(module, ()):
            return _stand_in(f"{module}.{name}")
        raise _refusal(self.source, f"{module}.{name}")

    def _load_from_bytes(self, data):
        if not isinstance(data, bytes) or self.depth >= _MAX_NESTING:
            raise CheckpointError(f"{self.source}: malformed embedded storage")
        return _load_stream(io.BytesIO(data), f"{self.source} (embedded storage)", self.depth + 1)

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise CheckpointError(f"{self.source}: unexpected persistent id {pid!r}")
        kind = pid[0].decode("ascii") if isinstance(pid[0], bytes) else pid[0]
        if kind == "module" and isinstance(pid[1], type) and issubclass(pid[1], StandIn):
            return pid[1]  # legacy format records module classes (with their source) this way
        if kind != "storage" or self.storages is None or not isinstance(pid[1], _StorageType):
            raise CheckpointError(f"{self.source}: unexpected persistent id {pid[:2]!r}")
        return self.storages.get(pid[1].dtype, *pid[2:])


class _ZipStorages:
    """Storages of a zip-format file, read from `<prefix>data/<key>` on first use."""

    def __init__(self, archive: zipfile.ZipFile, prefix: str, byteorder: str, source: str):
        self.archive, self.prefix, self.byteorder, self.source = archive, prefix, byteorder, source
        self.loaded: dict[str, _Storage] = {}

    def get(self, dtype, key, location, numel):
        nbytes = int(numel) * torch.empty((), dtype=dtype).element_size()
        if key in self.loaded and self.loaded[key].nbytes != nbytes:
            # torch would hand the second tensor the first declaration's bytes
            raise CheckpointError(f"{self.source}: storage {str(key)!r} is declared with "
                                  f"{self.loaded[key].nbytes} and with {nbytes} bytes; the file "
                                  f"is corrupt")
        if key not in self.loaded:
            name = f"{self.prefix}data/{key}"
            try:
                raw = self.archive.read(name)
            except KeyError:
                raise CheckpointError(f"{self.source}: storage record {name!r} is missing; "
                                      f"the file is truncated or corrupt") from None
            if len(raw) != nbytes:
                raise CheckpointError(f"{self.source}: storage {name!r} has {len(raw)} bytes, "
                                      f"expected {nbytes}; the file is corrupt")
            data = _bytes_tensor(raw)
            if self.byteorder != sys.byteorder:
                data = _byteswap(data, dtype)
            self.loaded[key] = _Storage(data, dtype, str(key))
        return self.loaded[key]


class _LegacyStorages:
    """Storages of a legacy-format file: allocated while unpickling, filled from the tail."""

    def __init__(self, source: str, file_size: int):
        self.source, self.budget = source, file_size
        self.roots: dict[str, _Storage] = {}

    def get(self, dtype, key, location, numel, view_metadata=None):
        esize = torch.empty((), dtype=dtype).element_size()
        if key not in self.roots:
            nbytes = int(numel) * esize
            self.budget -= nbytes  # never allocate more than the file could hold
            if nbytes < 0 or self.budget < 0:
                raise CheckpointError(f"{self.source}: storages larger than the file; it is "
                                      f"truncated or corrupt")
            self.roots[key] = _Storage(torch.empty(nbytes, dtype=torch.uint8), dtype, str(key))
        root = self.roots[key]
        if root.nbytes != int(numel) * esize:
            raise CheckpointError(f"{self.source}: storage {str(key)!r} is declared with "
                                  f"{root.nbytes} and with {int(numel) * esize} bytes; the file "
                                  f"is corrupt")
        if view_metadata is None:
            return root
        _view_key, offset, size = view_metadata  # pre-1.0 storage views
        try:
            return _Storage(root.data, dtype, str(key), int(offset) * esize, int(size) * esize)
        except CheckpointError as e:
            raise CheckpointError(f"{self.source}: {e}") from None

    def fill(self, f: BinaryIO, keys) -> None:
        if not isinstance(keys, list) or len(set(keys)) != len(keys) or set(keys) != set(self.roots):
            raise CheckpointError(f"{self.source}: the storage key list does not match the pickle")
        for key in keys:
            root = self.roots[key]
            esize = torch.empty((), dtype=root.dtype).element_size()
            header = f.read(8)
            if len(header) != 8:
                raise CheckpointError(f"{self.source}: truncated (storage {str(key)!r} missing)")
            (numel,) = struct.unpack("<q", header)
            if numel * esize != root.nbytes:  # checked before reading what it declares
                raise CheckpointError(f"{self.source}: storage {str(key)!r} declares {numel} "
                                      f"elements, the pickle {root.nbytes // esize}; the file is "
                                      f"corrupt")
            got = f.readinto(memoryview(root.data.numpy())) if root.nbytes else 0
            if got != root.nbytes:
                raise CheckpointError(f"{self.source}: storage {str(key)!r} is truncated ({got} "
                                      f"bytes, expected {root.nbytes})")
            if sys.byteorder != "little":  # legacy storages are always written little-endian
                root.data.copy_(_byteswap(root.data.clone(), root.dtype))


def check_zip_crc(path: str) -> None:
    """Refuse a zip-format torch file any of whose members fails its CRC-32: torch reads the
    stored bytes without checking it, so a flipped byte in a tensor record would load as a wrong
    weight without a word. zipfile checks each member's CRC as it reads it to the end."""
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, NotImplementedError) as e:
        raise CheckpointError(f"{path}: cannot read this zip-format torch file ({type(e).__name__}: "
                              f"{e}); it is truncated or corrupt: re-download or re-create it") from None
    if bad is not None:
        raise CheckpointError(f"{path}: record {bad!r} fails its CRC-32 check (its bytes changed "
                              f"after it was written: a bad copy or a failing disk); re-download or "
                              f"re-create the file")


def _load_zip(f: BinaryIO, source: str) -> Any:
    with zipfile.ZipFile(f) as archive:
        pickles = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
        if not pickles:
            raise CheckpointError(f"{source}: a zip without data.pkl is not a torch checkpoint")
        prefix = pickles[0][: -len("data.pkl")]
        byteorder = "little"  # files without the record predate big-endian support
        if f"{prefix}byteorder" in archive.namelist():
            byteorder = archive.read(f"{prefix}byteorder").decode("ascii", "replace")
            if byteorder not in ("little", "big"):
                raise CheckpointError(f"{source}: unknown byteorder record {byteorder!r}")
        storages = _ZipStorages(archive, prefix, byteorder, source)
        return _RestrictedUnpickler(io.BytesIO(archive.read(pickles[0])), source, storages).load()


def _load_stream(f: BinaryIO, source: str, depth: int = 0) -> Any:
    head = f.read(512)
    size = f.seek(0, io.SEEK_END)
    f.seek(0)
    if head.startswith(b"PK\x03\x04"):
        return _load_zip(f, source)
    if head[257:262] == b"ustar":
        raise CheckpointError(f"{source}: tar-format torch files (PyTorch < 0.4) are not supported")
    first = _RestrictedUnpickler(f, source, None, depth).load()
    if type(first) is not int or first != MAGIC_NUMBER:
        return first  # a plain pickle.dump: the first object is the whole file
    version = _RestrictedUnpickler(f, source, None, depth).load()
    if version != LEGACY_PROTOCOL_VERSION:
        raise CheckpointError(f"{source}: unsupported legacy torch protocol version {version!r}")
    _RestrictedUnpickler(f, source, None, depth).load()  # sys_info (sizes, endianness)
    storages = _LegacyStorages(source, size)
    result = _RestrictedUnpickler(f, source, storages, depth).load()
    storages.fill(f, _RestrictedUnpickler(f, source, None, depth).load())
    return result


def load_pickled_checkpoint(path: str) -> Any:
    """The pickled object of a torch zip, legacy or plain-pickle file; classes become stand-ins."""
    try:
        with open(path, "rb") as f:
            return _load_stream(f, str(path))
    except CheckpointError as e:
        if str(path) in str(e):
            raise
        raise CheckpointError(f"{path}: {e}") from e  # raised by a rebuilder, which has no path
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except MemoryError:
        # A corrupt length field: the unpickler allocates the declared size before reading it.
        raise CheckpointError(f"{path}: a record declares more bytes than memory holds; the file "
                              f"is truncated or corrupt") from None
    except RecursionError:
        raise CheckpointError(f"{path}: objects nested too deep to be a checkpoint; the file is "
                              f"corrupt or not a torch checkpoint") from None
    except (pickle.UnpicklingError, EOFError, zipfile.BadZipFile, struct.error, ValueError,
            TypeError, AttributeError, IndexError, KeyError, RuntimeError, OSError) as e:
        raise CheckpointError(f"{path}: cannot read this checkpoint ({type(e).__name__}: {e}); "
                              f"the file is truncated, corrupt or not a torch checkpoint") from e


# --- from stand-ins to a state dict ------------------------------------------------------------

# What nn.Module keeps in these (None: absent in pickles of old torch); anything else is corrupt.
_MODULE_INTERNALS = {"_parameters": (dict,), "_buffers": (dict, type(None)),
                     "_modules": (dict,),
                     "_non_persistent_buffers_set": (set, frozenset, list, tuple, type(None))}

def module_state_dict(obj: Any, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """What `obj.state_dict()` would return for the real module, read from its stand-in.

    Per module: parameters, then persistent buffers, then children, keys joined with dots. Buffers
    named in the pickled `_non_persistent_buffers_set`, or in NON_PERSISTENT_BUFFERS for the class
    (open_clip's `attn_mask`), are dropped, as the real `state_dict` drops them.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()

    def walk(module: Any, prefix: str) -> None:
        if id(module) in seen:  # a module shared under two names appears once, as in torch
            return
        seen.add(id(module))
        state = vars(module)
        where = f"{prefix[:-1] or 'the top object'} ({stand_in_name(module)})"
        if "_parameters" not in state or "_modules" not in state:
            raise CheckpointError(f"{source}: {where} is not a pickled nn.Module")
        for internal, kinds in _MODULE_INTERNALS.items():
            if internal in state and not isinstance(state[internal], kinds):
                raise CheckpointError(f"{source}: {where} has {internal} of type "
                                      f"{type(state[internal]).__name__}, not a "
                                      f"{kinds[0].__name__}; the file is corrupt or not a "
                                      f"pickled nn.Module")
        dropped = set(state.get("_non_persistent_buffers_set") or ())
        dropped |= NON_PERSISTENT_BUFFERS.get(stand_in_name(module), frozenset())
        buffers = {k: v for k, v in (state.get("_buffers") or {}).items() if k not in dropped}
        for name, tensor in list(state["_parameters"].items()) + list(buffers.items()):
            if tensor is None:
                continue
            if not isinstance(tensor, torch.Tensor):
                raise CheckpointError(f"{source}: {prefix}{name} is a {type(tensor).__name__}, "
                                      f"not a tensor")
            out[prefix + name] = tensor
        for name, child in state["_modules"].items():
            if child is None:
                continue
            if not is_stand_in(child):
                raise CheckpointError(f"{source}: submodule {prefix}{name} is a "
                                      f"{type(child).__name__}")
            walk(child, f"{prefix}{name}.")

    if not is_stand_in(obj):
        raise CheckpointError(f"{source}: expected a pickled nn.Module, found {type(obj).__name__}")
    try:
        walk(obj, "")
    except RecursionError:
        raise CheckpointError(f"{source}: submodules nested deeper than Python's recursion limit; "
                              f"the file is corrupt or not a checkpoint") from None
    return out


def safe_load(path: str) -> dict[str, torch.Tensor]:
    """The tensors of a pickled checkpoint: a module's state dict, or a pickled dict of tensors."""
    obj = load_pickled_checkpoint(path)
    if is_stand_in(obj):
        return module_state_dict(obj, str(path))
    if isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                     for k, v in obj.items()):
        return dict(obj)
    raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a pickled module or "
                          f"a state dict (str -> tensor)")


# --- plain data holding numpy arrays: CIFAR's python batches, tall_masks' .npy mask dicts ---------
#
# numpy pickles an array as `_reconstruct(ndarray, (0,), b'b')` followed by a BUILD with the state
# (version, shape, dtype, fortran_order, raw data), and a dtype as `dtype('u1', False, True)` with a
# BUILD of its byte order. Both globals map to inert records here; the records are turned into
# arrays after the pickle is read, from the raw bytes alone, so no numpy `__setstate__` ever runs on
# what the file says. Object arrays (np.save of a dict is a 0-d object array) hold elements that
# were themselves unpickled under these rules.

_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray")
# bool, signed/unsigned ints, floats, complex, bytes, str, object: no structured or void dtypes
_SIMPLE_DTYPE = re.compile(r"^[|<>=]?[biufcSUO]\d*$")


class _DtypeRecord:
    def __init__(self, spec):
        if not isinstance(spec, str) or not _SIMPLE_DTYPE.match(spec):
            raise CheckpointError(f"numpy dtype {spec!r} is not allowed (plain numeric, string "
                                  f"and object dtypes only)")
        self.dtype = np.dtype(spec)

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
            raise CheckpointError(f"malformed numpy dtype state {state!r}")
        if state[1] in "<>" and self.dtype.itemsize > 1:
            self.dtype = self.dtype.newbyteorder(state[1])


class _ArrayRecord:
    state = None

    def __setstate__(self, state):
        self.state = state

    @classmethod
    def of(cls, state) -> "_ArrayRecord":
        record = cls()
        record.state = state
        return record


def _np_dtype(spec, align=False, copy=False):
    return _DtypeRecord(spec)


def _np_reconstruct(cls, shape, typecode):
    if cls is not np.ndarray:
        raise CheckpointError(f"numpy _reconstruct of {cls!r} is not allowed (plain ndarrays only)")
    return _ArrayRecord()


def _np_scalar(dtype, data=None):
    if not isinstance(dtype, _DtypeRecord) or dtype.dtype.hasobject or not isinstance(data, (bytes, str)):
        raise CheckpointError("only numeric numpy scalars are allowed")
    raw = data.encode("latin1") if isinstance(data, str) else data
    return np.frombuffer(raw, dtype=dtype.dtype, count=1)[0]


def _np_frombuffer(buf, dtype, shape, order):
    # protocol 5 spells a contiguous numeric array this way
    if isinstance(dtype, np.dtype) and not dtype.hasobject and _SIMPLE_DTYPE.match(dtype.str):
        dtype = _DtypeRecord(dtype.str)
    return _ArrayRecord.of((1, tuple(shape), dtype, order == "F", bytes(buf)))


def _np_array(record: _ArrayRecord) -> np.ndarray:
    state = record.state
    if not (isinstance(state, tuple) and len(state) == 5):
        raise CheckpointError(f"malformed numpy array state ({type(state).__name__})")
    _, shape, dtype, fortran, data = state
    if (not isinstance(shape, tuple) or not all(isinstance(n, int) and n >= 0 for n in shape)
            or not isinstance(dtype, _DtypeRecord)):
        raise CheckpointError(f"malformed numpy array state (shape {shape!r}, dtype {dtype!r})")
    dtype, order = dtype.dtype, "F" if fortran else "C"
    count = int(np.prod(shape, dtype=np.int64))
    if dtype.hasobject:
        if not isinstance(data, list) or len(data) != count:
            raise CheckpointError("malformed numpy object array: its elements are not a list of "
                                  "the array's size")
        out = np.empty(count, dtype=object)
        for i, item in enumerate(data):
            out[i] = _np_resolve(item)
        return out.reshape(shape, order=order)
    raw = data.encode("latin1") if isinstance(data, str) else data  # Python 2 pickles hold str
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != count * dtype.itemsize:
        raise CheckpointError(f"malformed numpy array: {len(raw) if hasattr(raw, '__len__') else '?'} "
                              f"data bytes for shape {shape} of {dtype}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape, order=order).copy()


def _np_resolve(obj: Any) -> Any:
    """The unpickled tree with every array record built (containers rebuilt, others as they are)."""
    if isinstance(obj, _ArrayRecord):
        return _np_array(obj)
    if isinstance(obj, _DtypeRecord):
        return obj.dtype
    if isinstance(obj, dict):
        return {_np_resolve(k): _np_resolve(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_np_resolve(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_np_resolve(v) for v in obj)
    return obj


class _NumpyUnpickler(pickle.Unpickler):
    """Builtin containers and scalars (pickle's own opcodes) plus numpy arrays; nothing else."""

    def __init__(self, file: BinaryIO, source: str, encoding: str):
        super().__init__(file, encoding=encoding)
        self.source = source

    def find_class(self, module: str, name: str):
        module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if module in _NUMPY_MODULES and name in ("_reconstruct", "scalar"):
            return _np_reconstruct if name == "_reconstruct" else _np_scalar
        if module in ("numpy.core.numeric", "numpy._core.numeric") and name == "_frombuffer":
            return _np_frombuffer
        if (module, name) == ("numpy", "ndarray"):
            return np.ndarray
        if (module, name) == ("numpy", "dtype"):
            return _np_dtype
        if (module, name) in (("collections", "OrderedDict"), ("_codecs", "encode")):
            return _SAFE_GLOBALS[(module, name)]
        raise CheckpointError(f"{self.source}: refusing to unpickle {module}.{name}: this file may hold "
                              f"only plain data and numpy arrays (dicts, lists, numbers, strings, "
                              f"ndarrays), and anything else could run code from it; the file is "
                              f"corrupt, malicious or of another kind")

    def persistent_load(self, pid):
        raise CheckpointError(f"{self.source}: unexpected persistent id {pid!r}")


def load_numpy_pickle(file: BinaryIO, source: str, encoding: str = "ASCII") -> Any:
    """A pickle of plain data and numpy arrays (dicts, lists, str, numbers, ndarrays) read from
    `file` without running code from it; anything else it names is refused with CheckpointError.
    `encoding="latin1"` reads Python 2 pickles (CIFAR's batches), as numpy's own loaders do."""
    try:
        return _np_resolve(_NumpyUnpickler(file, source, encoding).load())
    except CheckpointError as e:
        raise e if source in str(e) else CheckpointError(f"{source}: {e}") from e
    except MemoryError:
        raise CheckpointError(f"{source}: a record declares more bytes than memory holds; the file "
                              f"is truncated or corrupt") from None
    except RecursionError:
        raise CheckpointError(f"{source}: objects nested too deep; the file is corrupt") from None
    except (pickle.UnpicklingError, EOFError, struct.error, ValueError, TypeError, AttributeError,
            IndexError, KeyError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{source}: cannot unpickle ({type(e).__name__}: {e}); the file is "
                              f"truncated, corrupt or not a pickle of arrays") from e


def load_npy(path: str) -> Any:
    """The array of an `.npy` file; an object array (what `np.save` writes for a dict or list) is
    read through `load_numpy_pickle` instead of numpy's `allow_pickle=True`."""
    from numpy.lib import format as npy_format
    try:
        with open(path, "rb") as f:
            version = npy_format.read_magic(f)
            read_header = (npy_format.read_array_header_1_0 if version == (1, 0)
                           else npy_format.read_array_header_2_0)
            shape, fortran, dtype = read_header(f)
            if not dtype.hasobject:
                f.seek(0)
                return npy_format.read_array(f, allow_pickle=False)
            array = load_numpy_pickle(f, str(path))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (ValueError, OSError, EOFError) as e:
        raise CheckpointError(f"{path}: not a readable .npy file ({e})") from e
    if not isinstance(array, np.ndarray) or array.shape != tuple(shape):
        raise CheckpointError(f"{path}: its pickled payload is not the array of shape {shape} that "
                              f"its header declares")
    return array


__all__ = ["CheckpointError", "ALLOWED_CLASSES", "NON_PERSISTENT_BUFFERS", "StandIn",
           "is_stand_in", "stand_in_name", "load_pickled_checkpoint", "module_state_dict",
           "safe_load", "load_numpy_pickle", "load_npy"]
