"""The embedded benchmark's build on the pinned CPU code paths gives the same files whatever CPU the
environment claims (compute/cpu_paths.py), and what pinning costs.

    python3 benchmarks/cpu_paths_build.py            # the micro benchmark, four environments (minutes)
    python3 benchmarks/cpu_paths_build.py --full     # the full benchmark: one build with another
                                                     # CPU claimed, compared with checkpoints/taskmerge-tiny

Each build is a fresh process into a folder of its own (its data prepared anew too), so nothing is
reused between them. Environments:
- native: the machine's own paths (ATen's vector ISA, MKL's and oneDNN's per-CPU kernels);
- pinned: `cpu_paths.PINNED` (how every build runs);
- pinned, other CPU claimed: as a CPU without AVX-512 (MKL_ENABLE_INSTRUCTIONS=AVX2, numpy's dispatch
  without AVX-512, glibc's without AVX-512, AVX2 and FMA), and ATen / oneDNN asked for AVX2;
- pinned, old CPU claimed: MKL at SSE4.2, ATen and oneDNN asked for AVX2 and AVX2.
Prints the build's wall time, its averages, and for every built file whether its sha256 equals the
pinned build's (or, with --full, the manifest's of the folder given). With --full the compared
folder's sha256 are README's.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

from taskmerge.compute import cpu_paths  # noqa: E402

OTHER_CPU = {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "NPY_DISABLE_CPU_FEATURES": "X86_V4 AVX512_ICL AVX512_SPR",
             "GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX512F,-AVX2,-FMA", "ATEN_CPU_CAPABILITY": "avx2",
             "ONEDNN_MAX_CPU_ISA": "AVX2"}
OLD_CPU = {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}

BUILD = """
import json, sys
sys.path.insert(0, {src!r})
from taskmerge.embedded.build import ensure_embedded_benchmark, read_manifest
folder = ensure_embedded_benchmark({ckpt!r}, {data!r}, micro={micro}, progress=False, pinned={pinned})
print(json.dumps(read_manifest(folder)))
"""


def build(root: str, env_changes: dict, pinned: bool, micro: bool) -> tuple[dict, float]:
    env = {k: v for k, v in os.environ.items() if k not in cpu_paths.PINNED}
    env.update(env_changes)
    code = BUILD.format(src=os.path.join(ROOT, "src"), ckpt=os.path.join(root, "ckpt"),
                        data=os.path.join(root, "data"), micro=micro, pinned=pinned)
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1]), time.perf_counter() - start


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="the full benchmark (about an hour)")
    parser.add_argument("--reference", default=os.path.join(ROOT, "checkpoints", "taskmerge-tiny"),
                        help="with --full: the built folder whose manifest to compare with")
    args = parser.parse_args()
    micro = not args.full
    if micro:
        cases = [("pinned", {}, True), ("native", {}, False), ("pinned, other CPU claimed", OTHER_CPU, True),
                 ("pinned, old CPU claimed", OLD_CPU, True)]
    else:
        cases = [("pinned, other CPU claimed", OTHER_CPU, True)]
        with open(os.path.join(args.reference, "manifest.json")) as f:
            reference = json.load(f)["sha256"]
    print(f"{'build':<28}{'wall s':>8}  {'zero-shot / experts / TA (%)':<30} files equal to the reference")
    with tempfile.TemporaryDirectory() as tmp:
        for name, env_changes, pinned in cases:
            root = os.path.join(tmp, name.replace(" ", "_").replace(",", ""))
            manifest, seconds = build(root, env_changes, pinned, micro)
            if micro and name == "pinned":
                reference = manifest["sha256"]
            folder = os.path.join(root, "ckpt", manifest["folder"])
            got = {f: sha256(os.path.join(folder, f)) for f in manifest["sha256"]}
            same = [f for f in got if reference.get(f) == got[f]]
            acc = manifest["accuracy"]
            avg = " / ".join(f"{100 * acc[k]['average']:.1f}" for k in ("zeroshot", "finetuned", "task_arithmetic_0.3"))
            differing = sorted(set(got) - set(same))
            print(f"{name:<28}{seconds:>8.1f}  {avg:<30} {len(same)} of {len(got)}"
                  + (f" (differ: {', '.join(differing)})" if differing else ""), flush=True)


if __name__ == "__main__":
    main()
