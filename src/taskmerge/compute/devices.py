"""One device setting for a whole run: "auto" (CUDA when torch sees a GPU, else the CPU) or any torch
device string, resolved once and refused loudly when it cannot be used, never swapped for the CPU.

TF32 is set explicitly by every run (`use_tf32`): torch ≥ 1.12 leaves TF32 matmuls off by default,
while the published numbers came from torch 1.8–1.10, where they were on for Ampere and later GPUs.
It has no effect on the CPU.
"""
from __future__ import annotations

import os

import torch

from taskmerge.storage.errors import ConfigError

AUTO = "auto"


def resolve_device(name: str, local_rank: int | None = None) -> torch.device:
    """The torch.device that `name` means here. Under torchrun a bare "cuda" (or "auto" on a GPU
    machine) becomes this process's own GPU, cuda:<LOCAL_RANK>."""
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if name == AUTO:
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ConfigError(f"setting device={name!r}: not a torch device; use 'auto', 'cpu', 'cuda' "
                          f"or 'cuda:<index>'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"setting device={name!r}: torch {torch.__version__} sees no CUDA GPU "
                              f"here; use device='cpu' (or 'auto'), or install a CUDA build of torch")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"setting device={name!r}: this machine has {torch.cuda.device_count()} "
                              f"CUDA device(s) (indices 0..{torch.cuda.device_count() - 1})")
        torch.cuda.set_device(device)
    elif device.type != "cpu" and not _backend_available(device):
        raise ConfigError(f"setting device={name!r}: torch has no usable {device.type} backend here")
    return device


def _backend_available(device: torch.device) -> bool:
    backend = getattr(torch, device.type, None)
    is_available = getattr(backend, "is_available", None)
    return bool(is_available and is_available())


def device_type(name: str) -> str:
    """The kind of device a `device` setting names ("cpu", "cuda", ...), without claiming it."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return torch.device(name).type
    except (RuntimeError, ValueError):
        return "unknown"  # resolve_device names the mistake


def use_tf32(enabled: bool) -> None:
    """TF32 for CUDA matmuls and cuDNN convolutions, on or off (see the module docstring)."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def device_description(device: torch.device) -> dict:
    """What the config line and the report record about where a run computed."""
    info = {"device": str(device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": None, "tf32": bool(torch.backends.cuda.matmul.allow_tf32),
            "threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def default_num_workers(device: torch.device, cpu_count: int | None = None) -> int:
    """DataLoader workers for "auto": none on the CPU, where decoding shares the cores the model
    needs (and the embedded benchmark's numbers are today's); on a GPU up to 8 per process,
    from the cores this process may use."""
    if device.type == "cpu":
        return 0
    if cpu_count is None:
        cpu_count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_rank = cpu_count // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return max(0, min(8, per_rank - 1))


def default_threads(device: torch.device, small_model: bool, cpu_count: int | None = None) -> int:
    """torch's intra-op threads for "auto". A small model's matrices (the embedded benchmark's width
    is 128) are too small to split: a second thread only spins waiting for its share, and on a busy
    2-core machine that turned minutes into hours; its numbers were also made with one thread. A real
    model uses the cores this process may use, shared among torchrun's local ranks."""
    if small_model:
        return 1
    if cpu_count is None:
        cpu_count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cpu_count // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1))
