"""The header of a .safetensors file, checked as strictly as the `safetensors` library checks it.

`SafetensorsReader` reads tensors with pread into memory it owns and never maps the file, so it
parses the header itself; this module is that parser. Every tensor is then read from exactly its
own bytes: a header whose declared shapes disagree with its byte ranges would otherwise make a
reader return a neighbour's bytes (or uninitialised memory) under a plausible-looking name.

The rules (those of safetensors' `Metadata::validate`, plus a refusal of duplicated names):
* an 8-byte little-endian header length, at most `MAX_HEADER_BYTES` and inside the file;
* the header is one JSON object without repeated names; `__metadata__`, if present, maps strings
  to strings; every other entry has a `dtype` this reader knows, a `shape` of non-negative integers and
  `data_offsets` [start, end] of integers;
* shape product × dtype size == end − start;
* sorted by offset, the tensors cover the data section from byte 0 to its last byte, each starting
  where the previous one ends (no gap, no overlap, nothing after the last).
"""
from __future__ import annotations

import json
import math
import struct
from typing import BinaryIO

import torch

from taskmerge.storage import atomic
from taskmerge.storage.safe_pickle import CheckpointError

DTYPES = {code: getattr(torch, name) for code, name in atomic.SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit


def _refuse(path: str, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}; the file is truncated or corrupt (re-convert or "
                           f"re-download it)")


def _object_without_repeats(pairs):
    names = [name for name, _ in pairs]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"tensor {repeated[0]!r} is declared {names.count(repeated[0])} times")
    return dict(pairs)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_header(f: BinaryIO, path: str, file_size: int) -> tuple[int, dict, dict]:
    """(data section start, {name: entry}, metadata) of the open file `f`, or a CheckpointError."""
    raw = f.read(8)
    if len(raw) != 8:
        raise _refuse(path, f"only {len(raw)} bytes, shorter than the 8-byte header length")
    (n,) = struct.unpack("<Q", raw)
    if n > min(MAX_HEADER_BYTES, file_size - 8):
        raise _refuse(path, f"header length {n} bytes runs past the {file_size}-byte file "
                            f"(or past safetensors' limit of {MAX_HEADER_BYTES})")
    try:
        header = json.loads(f.read(n), object_pairs_hook=_object_without_repeats)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise _refuse(path, f"header is not a JSON object ({e})") from None
    if not isinstance(header, dict):
        raise _refuse(path, f"header is a JSON {type(header).__name__}, not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise _refuse(path, "__metadata__ is not a mapping of strings to strings")
    data_size = file_size - 8 - n
    spans = []
    for name, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            raise _refuse(path, f"tensor {name!r} needs a dtype, a shape and data_offsets "
                                f"(has {sorted(entry) if isinstance(entry, dict) else entry!r})")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in DTYPES:
            raise _refuse(path, f"tensor {name!r} has dtype {dtype!r}, not one of {sorted(DTYPES)}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise _refuse(path, f"tensor {name!r} has shape {shape!r}, not a list of "
                                f"non-negative integers")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_int, offsets))
                or not 0 <= offsets[0] <= offsets[1] <= data_size):
            raise _refuse(path, f"tensor {name!r} has data_offsets {offsets!r}, not a byte range "
                                f"inside the {data_size}-byte data section")
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if nbytes != offsets[1] - offsets[0]:
            raise _refuse(path, f"tensor {name!r} of shape {shape} and dtype {dtype} needs {nbytes} "
                                f"bytes, its data_offsets {offsets} span {offsets[1] - offsets[0]}")
        spans.append((offsets[0], offsets[1], name))
    end, previous = 0, None
    for start, stop, name in sorted(spans):
        if start < end:
            raise _refuse(path, f"tensor {name!r} overlaps tensor {previous!r} (bytes {start} to "
                                f"{end})")
        if start > end:
            raise _refuse(path, f"a gap of {start - end} bytes before tensor {name!r}")
        end, previous = stop, name
    if end != data_size:
        raise _refuse(path, f"{data_size - end} bytes after the last tensor's data")
    return 8 + n, header, metadata
