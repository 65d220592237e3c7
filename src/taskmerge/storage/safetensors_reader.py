"""`SafetensorsReader`: a lazy state dict over one .safetensors file, read tensor by tensor.

Its own module because every checkpoint reader uses it: the task_vectors / converted layouts
(checkpoints.py), Hugging Face folders (hf_checkpoints.py) and the merging layer's own files.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Iterator, Mapping

import torch

from taskmerge.storage import safetensors_header
from taskmerge.storage.safe_pickle import CheckpointError

_README = 'see the README section "Real checkpoints"'
_ST_DTYPES = safetensors_header.DTYPES


class SafetensorsReader(Mapping[str, torch.Tensor]):
    """A lazy state dict over a .safetensors file: each `reader[key]` reads one tensor.

    `rename` maps the keys callers see to the keys stored (used for bare open_clip files).
    Key order is the original state-dict order when the converter recorded it.
    """

    def __init__(self, path: str, rename: Mapping[str, str] | None = None):
        self.path = str(path)
        # The header is parsed here and each tensor is read with pread into memory it owns: a
        # memory-mapped file would count every page a merge touched in the process's RSS, so
        # peak memory would grow with the number of experts.
        try:
            with open(self.path, "rb") as f:
                self._base, self._header, metadata = safetensors_header.read_header(
                    f, self.path, os.fstat(f.fileno()).st_size)
        except FileNotFoundError:
            raise CheckpointError(f"{self.path}: file not found; {_README}") from None
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot read this file ({e})") from None
        self.metadata = dict(metadata)
        stored = list(self._header)
        try:
            order = json.loads(metadata.get("key_order", "[]"))
        except ValueError:
            raise CheckpointError(f"{self.path}: the __metadata__ record key_order is not a JSON "
                                  f"list; the file is corrupt (re-run src/convert_checkpoints.py)"
                                  ) from None
        if (isinstance(order, list) and all(isinstance(k, str) for k in order)
                and sorted(order) == sorted(stored)):
            stored = order
        self._keys = dict(rename) if rename is not None else {k: k for k in stored}

    def __getitem__(self, key: str) -> torch.Tensor:
        info = self._header[self._keys[key]]
        return self._read(key, info, *info["data_offsets"], info["shape"])

    def read_flat(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of the flattened (row-major) tensor, read alone."""
        info = self._header[self._keys[key]]
        size = _ST_DTYPES[info["dtype"]].itemsize
        first = info["data_offsets"][0]
        numel = (info["data_offsets"][1] - first) // size
        if not 0 <= start <= stop <= numel:
            raise IndexError(f"{self.path}: elements [{start}, {stop}) of {key!r}, "
                             f"which has {numel} elements")
        return self._read(key, info, first + start * size, first + stop * size, [stop - start])

    def _read(self, key: str, info: dict, start: int, end: int, shape) -> torch.Tensor:
        """Bytes [start, end) of the data section as a new tensor of `shape` and `info`'s dtype."""
        stored = self._keys[key]
        out = torch.empty(shape, dtype=_ST_DTYPES[info["dtype"]])
        if end > start:
            view = memoryview(out.view(-1).view(torch.uint8).numpy())
            fd = os.open(self.path, os.O_RDONLY)
            try:
                done = 0
                while done < end - start:  # a large pread may return short
                    got = os.preadv(fd, [view[done:]], self._base + start + done)
                    if got == 0:
                        raise CheckpointError(f"{self.path}: tensor {stored!r} is cut short; "
                                              f"the file is truncated or corrupt")
                    done += got
            finally:
                os.close(fd)
        if sys.byteorder != "little" and out.element_size() > 1:
            out = out.view(-1).view(torch.uint8).view(-1, out.element_size()).flip(1).contiguous() \
                .view(out.dtype).view(out.shape)
        return out

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key) -> bool:
        return key in self._keys

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._header[self._keys[key]]["shape"])

    def dtype(self, key: str) -> torch.dtype:
        return _ST_DTYPES[self._header[self._keys[key]]["dtype"]]

    def __repr__(self) -> str:
        return f"SafetensorsReader({self.path!r}, {len(self)} tensors)"
