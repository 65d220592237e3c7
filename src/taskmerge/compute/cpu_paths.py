"""The same CPU code paths on every x86-64 machine, for the embedded benchmark's bits.

torch chooses its CPU kernels per machine: ATen's vectorised kernels per ISA (AVX-512, AVX2, none),
MKL's BLAS per CPU model and oneDNN's convolutions per ISA. Each choice rounds differently, and over
a 700-step pretraining the differences grow into other accuracies: the same commit built zero-shot /
experts / Task Arithmetic 43.7 / 91.7 / 72.2 on an Intel Xeon and 46.1 / 91.8 / 71.4 on an AMD EPYC.
`PINNED` names one path every x86-64 CPU has: ATen's scalar kernels, MKL's conditional numerical
reproducibility in its COMPATIBLE branch (the same results on every Intel and AMD CPU) and oneDNN at
SSE4.1. Thread counts are fixed by the callers (embedded/build.py, compute/devices.py).

The libraries read these variables once, at their first kernel (ATen) or when they load (MKL,
oneDNN), so they must be in the environment before the process computes anything: an entry script
restarts itself with them (`restart_pinned`), and a build asked for inside an unpinned process runs in
a child process that has them (embedded/build.py). Measured on a 2-core Intel Xeon: the micro
benchmark builds in 25.3 s pinned against 13.5 s native (README "Results on the embedded benchmark").
"""
from __future__ import annotations

import os
import sys
from typing import Mapping

PINNED: dict[str, str] = {
    "ATEN_CPU_CAPABILITY": "default",   # ATen's kernels without vector ISA extensions
    "MKL_CBWR": "COMPATIBLE",           # MKL: one code path for every Intel and AMD CPU
    "ONEDNN_MAX_CPU_ISA": "SSE41",      # oneDNN (the patch-embedding convolution): at most SSE4.1
}
SETTINGS = ("auto", "pinned", "native")
RESTARTED = "TASKMERGE_PINNED_RESTART"


def missing(environ: Mapping[str, str] | None = None) -> dict[str, str | None]:
    """The pinned variables that `environ` (default: this process's) lacks or sets otherwise."""
    environ = os.environ if environ is None else environ
    return {k: environ.get(k) for k, v in PINNED.items() if environ.get(k) != v}


def is_pinned() -> bool:
    """True when this process started with the pinned paths (and ATen took them: its choice is made
    once, at the first kernel, so variables set later are ignored)."""
    if missing():
        return False
    import torch
    return torch.backends.cpu.get_cpu_capability() == "DEFAULT"


def pinned_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """`environ` (default: this process's) with the pinned variables set."""
    return {**(os.environ if environ is None else environ), **PINNED}


def restart_pinned() -> None:
    """Replace this process by the command that started it, with the pinned environment (does not
    return). The process keeps its id, so torchrun and shells see the same child. A second restart
    is never asked for: `RESTARTED` marks the first."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]],
              {**pinned_environment(), RESTARTED: "1"})


def restarted() -> bool:
    """True in a process `restart_pinned` started."""
    return os.environ.get(RESTARTED) == "1"


def started_as(path: str) -> bool:
    """True when this process's command runs the file `path` (re-running the command re-runs it)."""
    target = os.path.realpath(path)
    return any(os.path.realpath(arg) == target for arg in sys.orig_argv[1:] if arg.endswith(".py"))


def describe() -> dict:
    """What a report records about the CPU code paths of this process."""
    import torch
    return {"cpu_paths": "pinned" if is_pinned() else "native",
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            **{k: os.environ.get(k) for k in PINNED}}
