"""Atomic writes: results, logs, caches and checkpoints are never left half-written.

Everything is written to a temporary file in the destination folder and moved into place with
`os.replace`, which is atomic on POSIX; an interrupted run leaves either the old file or none.

A run killed mid-write (kill -9, out of memory, power loss) cannot remove its temporary, which
would stay forever (1.2 GB for a ViT-L merge). So every write first sweeps the folder's stale
temporaries of our own naming, `.<name>.<host>-<pid>.<random>.tmp`: one is stale when its writer
ran on this host (same boot, same pid namespace) and that process is gone, or (written elsewhere,
or named the older way, `.<name>.<random>.tmp`) when nothing has written to it for `STALE_AFTER_S`.
A live writer's temporary is never removed: its process exists, and it writes as it goes.

Under torchrun only rank 0 writes (`writer.py`): on the other ranks both context managers hand out a
private scratch path that is thrown away, so callers write the same way on every rank.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import shutil
import socket
import stat
import struct
import sys
import tempfile
import time
from typing import Iterator

from taskmerge.storage.errors import InputError
from taskmerge.storage.writer import is_writer

STALE_AFTER_S = 24 * 3600


def _pid_space() -> str:
    """Where a pid means one process: this host, since its last boot, in this pid namespace (two
    containers sharing a folder and a host name still see different processes under one pid)."""
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
    with contextlib.suppress(OSError):
        parts.append(os.readlink("/proc/self/ns/pid"))
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:8]


_HOST = _pid_space()
_RANDOM = r"[a-z0-9_]{8}"  # tempfile.mkstemp's random part
_OURS = re.compile(rf"\..+\.(?P<host>[0-9a-f]{{8}})-(?P<pid>[0-9]+)\.{_RANDOM}\.tmp")
_OURS_BEFORE_PIDS = re.compile(rf"\..+\.{_RANDOM}\.tmp")


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def sweep_stale_temporaries(folder: str) -> list[str]:
    """Remove the stale temporaries that killed atomic writes left in `folder`; returns their paths.

    Only regular files named by `atomic_path` and folders named by `atomic_folder` are candidates
    (see the module docstring for which are stale); every error is ignored, since a concurrent
    sweep may have removed one first."""
    removed = []
    try:
        entries = [e for e in os.scandir(folder) if e.name.startswith(".") and e.name.endswith(".tmp")]
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        ours = _OURS.fullmatch(entry.name)
        if ours is None and not _OURS_BEFORE_PIDS.fullmatch(entry.name):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            is_folder = stat.S_ISDIR(st.st_mode) and ours is not None  # never a link's target
            if not (stat.S_ISREG(st.st_mode) or is_folder):
                continue
            if ours is not None and ours["host"] == _HOST:
                stale = not _process_exists(int(ours["pid"]))
            else:
                stale = now - st.st_mtime > STALE_AFTER_S
            if stale:
                shutil.rmtree(entry.path) if is_folder else os.remove(entry.path)
                removed.append(entry.path)
        except OSError:
            continue
    return removed


class OutputFolderError(InputError):
    """A folder a run must write into refuses it: read-only, full, not a folder, not ours."""


# Errors of the file system, not of the program: said in one line naming the folder.
REFUSALS = {errno.ENOSPC: "no space left", errno.EROFS: "read-only file system",
            errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
            errno.ENOTDIR: "a path component is not a folder", errno.EDQUOT: "disk quota exceeded",
            errno.EEXIST: "a file of that name is in the way", errno.EINVAL: "not a writable file system",
            errno.ENOENT: "the folder cannot be created there", errno.EFBIG: "file too large"}


@contextlib.contextmanager
def _refusals(path: str, what: str = "write") -> Iterator[None]:
    try:
        yield
    except OSError as e:
        if e.errno not in REFUSALS:
            raise
        folder = os.path.dirname(os.path.abspath(path))
        raise OutputFolderError(f"cannot {what} {path} ({REFUSALS[e.errno]}); free space in {folder} or "
                                f"choose a writable folder for it (nothing older there was changed)") from None


def write_refusal(folder: str) -> str | None:
    """Why `folder` cannot be created or written (a read-only or full disk, a path under /proc or
    /dev/null), or None: a probe file is written, synced and removed. Runs on every rank, so ranks
    that choose a folder by it choose alike."""
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".taskmerge-probe-", dir=folder)
        try:
            os.write(fd, b"\0" * 4096)
            os.fsync(fd)
        finally:
            os.close(fd)
            os.remove(probe)
    except OSError as e:
        return REFUSALS.get(e.errno, e.strerror or type(e).__name__)
    return None


def check_writable(folder: str, setting: str) -> None:
    """Refuse, before any work, an output folder that cannot be written (`write_refusal`), naming
    the setting. Only the writing rank checks: the others write nothing."""
    if not is_writer():
        return
    reason = write_refusal(folder)
    if reason is not None:
        raise OutputFolderError(f"setting {setting}={folder!r}: cannot write there ({reason}); choose a "
                                f"writable folder with free space (--{setting}=...)")


def _temporary_name(path: str) -> tuple[str, str]:
    folder = os.path.dirname(os.path.abspath(path))
    return folder, f".{os.path.basename(path)}.{_HOST}-{os.getpid()}."


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path next to `path`; on success it replaces `path`, on error it vanishes.

    Stale temporaries of killed writes in the same folder are swept first."""
    if not is_writer():
        with _discarded(os.path.basename(path)) as scratch:
            yield scratch
        return
    folder, prefix = _temporary_name(path)
    with _refusals(path):
        os.makedirs(folder, exist_ok=True)
        sweep_stale_temporaries(folder)
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
        os.close(fd)
        # mkstemp creates 0600; give the final file the permissions a plain open() would have.
        os.chmod(tmp, 0o666 & ~_umask())
    try:
        with _refusals(path):
            yield tmp
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


@contextlib.contextmanager
def atomic_folder(path: str) -> Iterator[str]:
    """Yield a new folder next to `path` holding `path`'s current files (hard links where the
    file system allows, so nothing is copied); on success it takes `path`'s place, on error it
    vanishes and `path` is untouched.

    Replacing a file inside the yielded folder must go through `atomic_path` (which renames a new
    file over the link) so the linked original is never written to. POSIX has no atomic exchange
    of two folders: `path` is moved aside, then the new folder into place, a window of two renames
    in which `path` is absent."""
    if not is_writer():
        with _discarded(os.path.basename(path)) as scratch:
            os.makedirs(scratch)
            yield scratch
        return
    folder, prefix = _temporary_name(path)
    with _refusals(path):
        os.makedirs(folder, exist_ok=True)
        sweep_stale_temporaries(folder)
        staging = tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=folder)
    try:
        with _refusals(path):
            os.chmod(staging, 0o777 & ~_umask())  # mkdtemp's 0700, unless copied from `path` below
            if os.path.isdir(path):
                shutil.copytree(path, staging, symlinks=True, dirs_exist_ok=True,
                                copy_function=_link_or_copy,
                                ignore=lambda _, names: [n for n in names if _OURS.fullmatch(n)])
            yield staging
            aside = None
            if os.path.isdir(path):
                aside = tempfile.mkdtemp(prefix=prefix, suffix=".tmp", dir=folder)
                os.rename(path, aside)  # onto the empty folder just made, which it replaces
            try:
                os.rename(staging, path)
            except BaseException:
                if aside is not None:
                    os.rename(aside, path)
                raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def _discarded(name: str) -> Iterator[str]:
    """A path in a private scratch folder, removed afterwards: a non-writing rank's "write"."""
    scratch = tempfile.mkdtemp(prefix="taskmerge-rank-")
    try:
        yield os.path.join(scratch, name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or one without hard links
        shutil.copy2(src, dst)


def write_bytes(path: str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def torch_save(obj, path: str) -> None:
    """`torch.save` of tensors / dicts of tensors, atomically (loadable with weights_only=True)."""
    import torch
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())


SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
                      "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
                      "BOOL": "bool"}


def save_safetensors(tensors: dict, path: str, metadata: dict | None = None) -> None:
    """Write `tensors` as a .safetensors file, one tensor at a time.

    The format is an 8-byte little-endian header length, a JSON header (dtype, shape, byte range
    of each tensor, `__metadata__` strings) and the raw little-endian bytes. Writing it here
    streams each tensor's own memory to the file; `safetensors.torch.save_file` first copies every
    tensor into a bytes object, so saving a merged ViT-B/32 held a second model copy (0.45 GB).
    Files are read back by `safetensors` and by `safetensors_reader.SafetensorsReader` alike."""
    import torch
    codes = {getattr(torch, name): code for code, name in SAFETENSORS_DTYPES.items()}
    header, offset = {}, 0
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor) or tensor.dtype not in codes:
            raise TypeError(f"{path}: {key!r} is not a tensor of a safetensors dtype")
        size = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": codes[tensor.dtype], "shape": list(tensor.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)))
            f.write(encoded)
            for tensor in tensors.values():
                if tensor.numel() == 0:
                    continue
                data = tensor.detach().cpu().contiguous().view(-1)
                if sys.byteorder != "little" and data.element_size() > 1:
                    data = data.view(torch.uint8).view(-1, data.element_size()).flip(1).contiguous()
                f.write(memoryview(data.view(torch.uint8).numpy()))
