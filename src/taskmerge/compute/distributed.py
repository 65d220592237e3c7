"""Several processes on torch.distributed: `torchrun --nproc_per_node=N src/main_X.py` (NCCL between
GPUs, gloo on the CPU). One process is the single-rank case of every function here, with no
collective called, so a plain run computes exactly what it computed before.

What is split: each evaluation and feature pass takes a contiguous shard of the test set per rank
and gathers counts or rows back in dataset order; an AdaMerging step spreads its 2·T entropy batches
over the ranks and sums the coefficient gradient. Everything else (the random draws, Adam steps,
Surgery's training) runs the same on every rank, so every rank holds the same state. Only rank 0
writes files (storage/writer.py).

A collective must be reached by every rank in the same order, so every decision that leads to one
(a cache hit or miss, a resume) must come out the same on every rank. It does because each is read
before a collective that rank 0 must pass before it can write that file (the training loops put a
barrier right after reading their resume state), so no rank can see a file another rank is about
to decide without.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

from taskmerge.storage.errors import InputError


def launched() -> bool:
    """Whether torchrun (or any launcher setting WORLD_SIZE) started several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


class RendezvousError(InputError):
    """The ranks of a torchrun launch did not all arrive in time."""


class PeerRefused(InputError):
    """Another rank refused the run (its own message says why); this rank stops quietly."""


def raise_together(error: InputError | None) -> None:
    """Every rank stops if any rank found `error` (checked on one rank, e.g. rank 0's output
    folders): one collective, so no rank runs on into a collective its peer never reaches."""
    if not active():
        if error is not None:
            raise error
        return
    flag = all_reduce_sum(torch.tensor([0 if error is None else 1], dtype=torch.int64))
    if error is None and int(flag.item()):
        error = PeerRefused("another rank refused the run; its message says why")
    if error is not None:
        error.all_ranks = True  # every rank stops with it: `stop_together` lets the refusing one speak
        raise error


def stop_together(error: BaseException) -> None:
    """After an error that every rank raised (`raise_together`) has been printed: wait for the other
    ranks, so none exits (and has torchrun kill the rest) before the refusing rank has said why."""
    if active() and getattr(error, "all_ranks", False):
        barrier()


def init(device: torch.device, timeout_s: float = 3600.0, rendezvous_timeout_s: float = 300.0) -> str | None:
    """Join torchrun's process group once (NCCL for CUDA devices, gloo otherwise); None when the
    script was not launched with several processes. Other ranks stop drawing progress bars.

    The ranks first meet on the launcher's store, each waiting at most `rendezvous_timeout_s` for the
    others: torch's own rendezvous waits the collective timeout (an hour) in silence when a peer never
    starts. `timeout_s` then bounds each collective (rank 0 may build the benchmark while the others
    wait)."""
    if not launched():
        return None
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        store, r, w = _rendezvous(rendezvous_timeout_s)
        dist.init_process_group(backend, store=store, rank=r, world_size=w,
                                timeout=timedelta(seconds=timeout_s), **kwargs)
    if not is_main():
        os.environ["TQDM_DISABLE"] = "1"
    return dist.get_backend()


def _rendezvous(timeout_s: float):
    """(store, rank, world size) once every rank has reached the store, else a RendezvousError."""
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT", "RANK") if k not in os.environ]
    if missing:
        raise RendezvousError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: "
                              f"launch with torchrun --nproc_per_node=N src/main_X.py, or unset WORLD_SIZE")
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    r, w = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    where = f"{host}:{port}"
    hint = (f"start all {w} ranks (torchrun --nproc_per_node={w}, or --nnodes with every node launched), "
            f"or raise rendezvous_timeout (now {timeout_s:g} s)")
    # Under torchrun the agent already serves the store on MASTER_PORT; every rank is its client.
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    try:
        store = dist.TCPStore(host, port, w, is_master=(r == 0 and not agent),
                              timeout=timedelta(seconds=timeout_s), wait_for_workers=False)
    except (RuntimeError, OSError) as e:  # DistNetworkError and DistStoreError are RuntimeErrors
        raise RendezvousError(f"rank {r} of {w}: could not reach the rendezvous store at {where} within "
                              f"{timeout_s:g} s ({type(e).__name__}); {hint}") from None
    key = f"taskmerge/arrived/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    store.add(key, 1)
    deadline = time.monotonic() + timeout_s
    while (arrived := store.add(key, 0)) < w:
        if time.monotonic() > deadline:
            raise RendezvousError(f"rank {r} of {w}: only {arrived} of {w} ranks reached the rendezvous "
                                  f"at {where} within {timeout_s:g} s; {hint}")
        time.sleep(0.05)
    return store, r, w


def backend() -> str | None:
    return dist.get_backend() if active() else None


def barrier() -> None:
    if active():
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (e.g. builds a cache), then the others run it and find it built."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def shard(n: int) -> range:
    """This rank's contiguous slice of n items (rank r: [r·n/W, (r+1)·n/W))."""
    w, r = world_size(), rank()
    return range(r * n // w, (r + 1) * n // w)


def _comm_device() -> torch.device:
    """Where tensors must sit for the collectives: the rank's GPU under NCCL, else the CPU."""
    if active() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks, in place (returned for convenience)."""
    if active():
        buf = tensor.to(_comm_device())
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        if buf is not tensor:
            tensor.copy_(buf)
    return tensor


def sum_counts(*counts: int) -> tuple[int, ...]:
    """Integer counts (e.g. correct, total) summed over ranks, exactly (int64)."""
    t = torch.tensor(counts, dtype=torch.int64)
    return tuple(int(v) for v in all_reduce_sum(t).tolist())


def gather_rows(part: torch.Tensor, n: int, dim: int = 0) -> torch.Tensor:
    """Every rank's `shard(n)` rows of one tensor (along `dim`), concatenated in rank order: the
    whole tensor in dataset order, on every rank, on the CPU. The other dims may be any size."""
    if not active():
        return part
    if dim != 0:
        return gather_rows(part.movedim(dim, 0), n).movedim(0, dim).contiguous()
    w = world_size()
    sizes = [(r + 1) * n // w - r * n // w for r in range(w)]
    dev = _comm_device()
    padded = torch.zeros((max(sizes), *part.shape[1:]), dtype=part.dtype, device=dev)
    padded[: len(part)] = part.to(dev)
    out = [torch.empty_like(padded) for _ in range(w)]
    dist.all_gather(out, padded)
    return torch.cat([o[:s] for o, s in zip(out, sizes)]).cpu()


def broadcast_module(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers in `module` on every rank."""
    if not active():
        return
    dev = _comm_device()
    for t in list(module.parameters()) + list(module.buffers()):
        buf = t.detach().to(dev)
        dist.broadcast(buf, src=0)
        if buf is not t:
            with torch.no_grad():
                t.copy_(buf)
