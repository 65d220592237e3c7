"""Which process writes files. Under torchrun every rank runs the same script, and only rank 0 may
write results, logs, caches, checkpoints and resume state; every rank reads them. The atomic writers
(`atomic.py`) ask here, so no caller needs to know whether it runs in several processes."""
from __future__ import annotations

import os


def rank() -> int:
    """This process's global rank: torch.distributed's once initialized, else torchrun's RANK."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_writer() -> bool:
    return rank() == 0
