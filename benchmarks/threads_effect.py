"""The `threads` setting's effect on a first run: a short layer-wise AdaMerging run on the embedded
benchmark (the default `main_AdaMerging` path, a few steps) with threads=1 ("auto" for the embedded
model) and threads=<cores> (torch's default), each on a quiet machine and beside busy processes
(pure-Python spin loops, one per `--busy` count, as another user's job would be).

    python3 benchmarks/threads_effect.py [--model=taskmerge-tiny] [--steps=6] [--busy=1]

Prints, per setting, the run's wall time, its user and system CPU seconds (a spinning second thread
shows as CPU time far above the wall time) and its peak RSS. Each run is a fresh process, resume
and saving off, so nothing is reused between them; the benchmark is built first if needed.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _spin() -> None:
    while True:
        pass


def _run(args, threads: int, log_dir: str) -> dict:
    cmd = [sys.executable, os.path.join(ROOT, "src", "main_AdaMerging.py"), f"--model_name={args.model}",
           f"--checkpoint_dir={args.checkpoint_dir}", f"--data_location={args.data_location}",
           f"--threads={threads}", "--method_name=lw_adamerging", "--coefficients=learn",
           f"--adamerging_steps={args.steps}", f"--adamerging_eval_every={args.steps}", "--resume_dir=",
           "--save_dir=", f"--log_dir={log_dir}", "--device=cpu"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   env={k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")})
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall": wall, "user": after.ru_utime - before.ru_utime, "sys": after.ru_stime - before.ru_stime,
            "peak_gib": after.ru_maxrss / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="taskmerge-tiny")
    parser.add_argument("--checkpoint_dir", default="checkpoints")
    parser.add_argument("--data_location", default="data")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--busy", type=int, default=1, help="competing spin processes in the busy rows")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with tempfile.TemporaryDirectory() as logs:
        # Build (or find) the benchmark and warm the file cache, untimed.
        _run(args, 1, logs)
        rows = []
        for busy in (0, args.busy):
            spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(busy)]
            for p in spinners:
                p.start()
            try:
                for threads in dict.fromkeys((1, cores)):
                    rows.append((threads, busy, _run(args, threads, logs)))
            finally:
                for p in spinners:
                    p.kill()
                    p.join()
    print(f"{args.model}, lw_adamerging {args.steps} steps, {cores} cores, torch threads 1 vs {cores}")
    print("| threads | competing processes | wall s | user CPU s | sys CPU s | peak GiB (any child) |")
    print("|---|---|---|---|---|---|")
    for threads, busy, r in rows:
        print(f"| {threads} | {busy} | {r['wall']:.1f} | {r['user']:.1f} | {r['sys']:.1f} | {r['peak_gib']:.2f} |")


if __name__ == "__main__":
    main()
