"""Binary masks stored at one bit per parameter (EMR masks, TALL masks).

Bits are packed with `numpy.packbits` in its default big-endian bit order over the flattened
tensor, the layout tall_masks writes (METHODS.md §2.13); a mask of n entries takes ceil(n/8) bytes.
Packed masks are plain uint8 tensors, so they go into safetensors files unchanged.
"""
from __future__ import annotations

import json
from typing import Mapping, Sequence

import numpy as np
import torch

from taskmerge.storage import atomic
from taskmerge.storage.checkpoints import SafetensorsReader  # preads into owned memory, never maps the file


def pack(mask: torch.Tensor) -> torch.Tensor:
    """A boolean tensor as a 1-D uint8 tensor of ceil(numel/8) bytes."""
    if mask.dtype != torch.bool:
        raise TypeError(f"pack expects a bool tensor, got {mask.dtype}")
    return torch.from_numpy(np.packbits(mask.reshape(-1).numpy()))


def unpack(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """The boolean tensor of `shape` that `pack` turned into `packed`."""
    numel = int(np.prod(shape, dtype=np.int64))
    if packed.dtype != torch.uint8 or packed.numel() != (numel + 7) // 8:
        raise ValueError(f"packed mask has {packed.numel()} bytes of {packed.dtype}; a mask of "
                         f"shape {tuple(shape)} needs {(numel + 7) // 8} uint8 bytes")
    bits = np.unpackbits(packed.reshape(-1).numpy(), count=numel)
    return torch.from_numpy(bits.view(np.bool_)).reshape(tuple(shape))


def save_file(tensors: Mapping[str, torch.Tensor], path: str, header: dict) -> None:
    """A compact merge result as safetensors, atomically; `header` goes to the metadata as JSON."""
    atomic.save_safetensors(dict(tensors), path, metadata={"taskmerge": json.dumps(header)})


def open_file(path: str, expected_format: str) -> tuple[dict, SafetensorsReader]:
    """(header, lazy reader) of a file written by `save_file`, checking what it holds."""
    reader = SafetensorsReader(path)
    header = json.loads(reader.metadata.get("taskmerge", "{}"))
    if header.get("format") != expected_format:
        raise ValueError(f"{path}: holds {header.get('format') or 'no taskmerge result'!r}, "
                         f"expected {expected_format!r}; was it written by another method?")
    return header, reader


def load_file(path: str, expected_format: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, header) of a file written by `save_file`, checking what it holds."""
    header, reader = open_file(path, expected_format)
    return {k: reader[k] for k in reader}, header
