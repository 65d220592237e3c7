"""Content digests of files, computed once and remembered.

Cache keys and resume states name their checkpoints and data files by these digests, so a digest has
to change whenever a byte does: an expert edited in the middle with its mtime put back (`cp -p`,
`rsync -a`, `touch -r`) must not reuse what was computed on the old one. So the digest is a sha256 of
the whole file. Hashing a ViT-L/14 expert takes about a second, so each digest is remembered, keyed
by the file's (size, mtime_ns, ctime_ns, inode, device): any write changes ctime, and ctime cannot be
set back by a user, so a remembered digest is only reused for the very bytes it was computed on.

The memo lives in `cache_dir()` (`TASKMERGE_CACHE_DIR`, else `$XDG_CACHE_HOME/taskmerge`, else
`~/.cache/taskmerge`) as `file_digests.json`. It only saves time: a memo that cannot be read or
written is ignored, and every digest is then computed again.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading

from taskmerge.storage import atomic

MEMO_NAME = "file_digests.json"
MEMO_LIMIT = 20000          # entries kept; the oldest are dropped first
_CHUNK = 8 << 20

_lock = threading.Lock()
_memo: dict[str, dict] | None = None   # realpath -> {"stat": [...], "sha256": hex}
_memo_source: str | None = None        # the memo file `_memo` was read from


def cache_dir() -> str:
    """Where taskmerge keeps caches that belong to no model folder (file digests)."""
    explicit = os.environ.get("TASKMERGE_CACHE_DIR")
    if explicit:
        return explicit
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "taskmerge")


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _load_memo(path: str) -> dict[str, dict]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict) and isinstance(v.get("stat"), list)
            and isinstance(v.get("sha256"), str)}


def _memo_for(path: str) -> dict[str, dict]:
    global _memo, _memo_source
    if _memo is None or _memo_source != path:
        _memo, _memo_source = _load_memo(path), path
    return _memo


def _save_memo(path: str, memo: dict[str, dict]) -> None:
    # Another process may have remembered other files since we read the memo: keep its entries.
    merged = {**_load_memo(path), **memo}
    if len(merged) > MEMO_LIMIT:
        merged = dict(list(merged.items())[-MEMO_LIMIT:])
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic.write_json(path, merged)
    except OSError:
        pass  # read-only or full cache folder: the digest is still right, only not remembered


def sha256_file(path: str) -> str:
    """The sha256 (hex) of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def content_digest(path: str) -> str:
    """sha256 of the file's bytes (32 hex characters), remembered by (size, mtime, ctime, inode)."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = _stat_key(st)
    memo_path = os.path.join(cache_dir(), MEMO_NAME)
    with _lock:
        entry = _memo_for(memo_path).get(real)
        if entry is not None and entry["stat"] == key:
            return entry["sha256"]
    digest = sha256_file(real)[:32]
    if _stat_key(os.stat(real)) != key:
        return digest   # written while it was read: right for no version of the file, remember none
    with _lock:
        memo = _memo_for(memo_path)
        memo.pop(real, None)
        memo[real] = {"stat": key, "sha256": digest}
        _save_memo(memo_path, memo)
    return digest


def legacy_fingerprint(path: str) -> str:
    """The fingerprint taskmerge used before content digests (size, mtime, first and last MiB).
    Only to recognise files converted by an older taskmerge as up to date; never a cache key."""
    mib = 1 << 20
    st = os.stat(path)
    h = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode())
    with open(path, "rb") as f:
        h.update(f.read(mib))
        if st.st_size > mib:
            f.seek(max(mib, st.st_size - mib))
            h.update(f.read(mib))
    return h.hexdigest()[:32]


__all__ = ["cache_dir", "content_digest", "legacy_fingerprint", "sha256_file", "MEMO_NAME"]
