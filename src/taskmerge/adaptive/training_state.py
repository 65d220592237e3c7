"""Interrupt and resume for AdaMerging and Surgery: the trainable state, the optimizer, the step and
the sampling generator are written atomically every N steps, in a file named by the run's config
hash; a restarted run with the same configuration picks it up and finishes with the same numbers.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import Callable, Iterable, Mapping

import torch

from taskmerge.storage import atomic
from taskmerge.storage.errors import ConfigError, InputError
from taskmerge.storage.safe_pickle import check_zip_crc


def run_hash(kind: str, key: dict) -> str:
    """A short digest of everything that determines a run's numbers."""
    text = json.dumps({"kind": kind, **key}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def differing_fields(old: Mapping, new: Mapping, prefix: str = "") -> list[str]:
    """The (dotted) fields whose values differ between two keys, for the log line that says why a
    saved state or cached value was not reused."""
    out = []
    for k in sorted(set(old) | set(new), key=str):
        a, b = old.get(k), new.get(k)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += differing_fields(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}")
    return out


def read_resume_state(path: str) -> dict:
    """A resume file's state dict, or one InputError naming the file. torch's own messages are not
    passed on: for a file that holds code they advise loading it without the weights-only guard,
    which would run that code."""
    try:
        with warnings.catch_warnings():  # torch's notes on a foreign file's pickle protocol
            warnings.simplefilter("ignore")
            check_zip_crc(path)  # torch.load would read a flipped byte as a changed weight
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, not a torch file, a pickle with code, a disk error
        raise InputError(f"{path}: cannot be read as a resume state ({type(e).__name__}; truncated, "
                         f"corrupt, or not written by taskmerge); it was not loaded: delete it to start "
                         f"over, or set resume_dir to another folder") from None
    if not isinstance(state, dict) or not isinstance(state.get("key"), dict):
        raise InputError(f"{path}: not a resume state written by taskmerge (no run key); delete it to "
                         f"start over, or set resume_dir to another folder")
    return state


class TrainingCheckpoint:
    """`<folder>/<kind>_<hash>.pt`, saved every `every` steps and at the end; no-op if folder is None."""

    def __init__(self, folder: str | None, kind: str, key: dict, every: int):
        if every is not None and every < 1:
            raise ConfigError(f"checkpoint_every must be >= 1 (got {every})")
        self.kind, self.folder = kind, folder
        self.key = json.loads(json.dumps(key, sort_keys=True, default=str))  # what the file records
        self.key_hash = run_hash(kind, key)
        self.every = every
        self.path = None if folder is None else os.path.join(folder, f"{kind}_{self.key_hash}.pt")

    def load(self, log: Callable[[str], None] | None = None) -> dict | None:
        """The saved state of this very run, or None; `log` hears why a run starts fresh."""
        if self.path is None or not os.path.exists(self.path):
            if log is not None and self.path is not None:
                log(self.fresh_start_reason())
            return None
        state = read_resume_state(self.path)
        if state.get("key_hash") != self.key_hash:
            raise InputError(f"{self.path}: written by a different run configuration "
                             f"({state.get('key_hash')} != {self.key_hash}); delete it to start over")
        return state

    def fresh_start_reason(self) -> str:
        """Why no saved state is resumed: none of this kind in the folder, or the newest one's key
        and this run's differ in the fields named."""
        others = [] if not os.path.isdir(self.folder) else sorted(
            (os.path.join(self.folder, f) for f in os.listdir(self.folder)
             if f.startswith(f"{self.kind}_") and f.endswith(".pt")), key=os.path.getmtime)
        if not others:
            return f"{self.kind}: no saved state in {self.folder}; starting from step 0"
        try:
            newest = torch.load(others[-1], map_location="cpu", weights_only=True).get("key")
        except Exception:  # an unreadable neighbour only costs the explanation
            newest = None
        if not isinstance(newest, Mapping):
            return (f"{self.kind}: no saved state for these inputs in {self.folder}; starting from step 0")
        fields = differing_fields(newest, self.key)
        return (f"{self.kind}: no saved state for these inputs; the newest in {self.folder} "
                f"({os.path.basename(others[-1])}) differs in {', '.join(fields) or 'its key'}; "
                f"starting from step 0")

    def maybe_save(self, step: int, make_state: Callable[[], dict], final: bool = False) -> bool:
        if self.path is None or not (final or step % self.every == 0):
            return False
        atomic.torch_save({"key_hash": self.key_hash, "key": self.key, "step": step, **make_state()},
                          self.path)
        return True


def grad_presence(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """Which parameters hold a .grad tensor: with zero_grad(set_to_none=False) Adam keeps moving
    exactly those, so a resumed run must recreate them (as zeros) to continue identically."""
    return torch.tensor([p.grad is not None for p in params], dtype=torch.bool)


def restore_grad_presence(params: Iterable[torch.Tensor], present: torch.Tensor) -> None:
    for p, has in zip(params, present.tolist()):
        p.grad = torch.zeros_like(p) if has else None
