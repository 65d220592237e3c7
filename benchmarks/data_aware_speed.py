"""Speed and peak memory of Fisher merging and RegMean at 8 / 14 / 20 ViT-B/32-size experts on the CPU
(issue 20): the statistics pass of one expert at 256 images, then the merge of 8, 14, 20 experts
with their statistics, each in a fresh process (peak RSS is the process's own).

    python3 benchmarks/data_aware_speed.py                 # 2 threads, the experts of merge_speed.py
    python3 benchmarks/data_aware_speed.py --tasks=[8] --images=64

The experts are merge_speed.py's random ViT-B/32 experts (built once into its cache folder, shared).
The statistics pass runs on random 224² images through an expert and a random 100-class head; its
time is per expert, so a run's statistics cost `tasks ×` it (the log of a real run prints each).
The merge phase reads the experts lazily and gives each the statistics of the pass (the same tensors
for every task, which costs the merge what distinct ones cost), so what it measures is the merge:
the accumulation expert by expert and the final division (Fisher) or solves (RegMean). RegMean++
takes its statistics inside the merge (each block's inputs come through the blocks merged before
it), so its row is the whole of both, on random images made per task as the run reads them.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

from taskmerge.runs.config import configure  # noqa: E402

tasks = [8, 14, 20]
methods = ["fisher", "regmean", "regmean_plusplus"]
images = 256                  # training images per task (FusionBench's num_*_examples)
batch_size = 32
threads = 2
cache_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache")
worker = ""                   # internal: "stats_<method>" | "merge_<method>"
num_tasks = 0

config = configure(globals())


def stats_path(method: str) -> str:
    return os.path.join(cache_dir, "data_aware", f"{method}_stats.safetensors")


def expert_path(i: int) -> str:   # merge_speed.py's files (importing it would read our argv)
    return os.path.join(cache_dir, f"expert_{i:02d}.safetensors")


def pretrained_path() -> str:
    return os.path.join(cache_dir, "pretrained.safetensors")


def _peak_gib() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class _RandomImages:
    """{task: TaskImages} of random 224² images, made when asked for (as the runs' SampledImages)."""

    def __init__(self, tasks, n):
        self.tasks, self.n = tasks, n

    def __getitem__(self, task):
        import torch

        from taskmerge.adaptive.adaptation_data import TaskImages
        g = torch.Generator().manual_seed(self.tasks.index(task))
        return TaskImages.from_tensors(torch.randn(self.n, 3, 224, 224, generator=g), torch.zeros(self.n))

    def __iter__(self):
        return iter(self.tasks)

    def __len__(self):
        return len(self.tasks)


def run_worker() -> None:
    import torch
    from safetensors.torch import load_file

    from taskmerge.adaptive import statistics as stats
    from taskmerge.adaptive.adaptation_data import TaskImages
    from taskmerge.merging.fisher import FisherAccumulator
    from taskmerge.merging.regmean import RegMeanAccumulator
    from taskmerge.merging.task_vectors import merged_keys
    from taskmerge.models.encoders import build_image_encoder
    from taskmerge.models.heads import ClassificationHead
    from taskmerge.storage import atomic
    from taskmerge.storage.allocator import recycle_freed_memory
    from taskmerge.storage.checkpoints import open_state_dict
    torch.set_num_threads(threads)
    recycle_freed_memory()
    kind, method = worker.split("_", 1)
    theta0 = open_state_dict(pretrained_path())
    keys = merged_keys(theta0)
    maps = stats.linear_maps(keys)
    if kind == "stats":
        g = torch.Generator().manual_seed(0)
        encoder = build_image_encoder("ViT-B-32", open_state_dict(expert_path(0)))
        data = TaskImages.from_tensors(torch.randn(images, 3, 224, 224, generator=g),
                                       torch.randint(0, 100, (images,), generator=g))
        head = ClassificationHead(torch.randn(100, encoder.feature_dim, generator=g))
        t0 = time.time()
        if method == "fisher":
            out = stats.diagonal_fisher(encoder, head, data, keys, batch_size=batch_size)
        else:
            out = stats.gram_matrices(encoder, data, maps, batch_size=batch_size)
        seconds = time.time() - t0
        atomic.save_safetensors({k: v.contiguous() for k, v in out.items()}, stats_path(method))
        print(json.dumps({"seconds": seconds, "peak_gib": _peak_gib(),
                          "bytes": sum(v.numel() * 4 for v in out.values())}))
        return
    if method == "regmean_plusplus":   # its statistics are taken inside the merge, block by block
        experts = {f"t{i}": open_state_dict(expert_path(i)) for i in range(num_tasks)}
        t0 = time.time()
        merged = stats.regmean_plusplus(build_image_encoder("ViT-B-32"), theta0, experts,
                                        _RandomImages(list(experts), images), keys, ratio=0.95,
                                        batch_size=batch_size, log=lambda s: None)
        seconds = time.time() - t0
        assert all(torch.isfinite(v).all() for v in merged.values())
        print(json.dumps({"seconds": seconds, "peak_gib": _peak_gib()}))
        return
    statistic = load_file(stats_path(method))
    experts = [open_state_dict(expert_path(i)) for i in range(num_tasks)]
    t0 = time.time()
    if method == "fisher":
        acc = FisherAccumulator(theta0, keys)
    else:
        acc = RegMeanAccumulator(theta0, maps, keys, ratio=0.95)
    for expert in experts:
        acc.add(expert, statistic)
    merged = acc.merged()
    seconds = time.time() - t0
    assert all(torch.isfinite(v).all() for v in merged.values())
    print(json.dumps({"seconds": seconds, "peak_gib": _peak_gib()}))


def _run(args: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    done = subprocess.run([sys.executable, os.path.abspath(__file__), *args, f"--threads={threads}",
                           f"--images={images}", f"--batch_size={batch_size}", f"--cache_dir={cache_dir}"],
                          capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    if worker:
        return run_worker()
    os.makedirs(os.path.join(cache_dir, "data_aware"), exist_ok=True)
    subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "merge_speed.py"),
                    "--worker=build", f"--num_tasks={max(tasks)}", f"--cache_dir={cache_dir}"], check=True)
    print(f"torch threads: {threads}; cpu count: {os.cpu_count()}; load average before: {os.getloadavg()[0]:.2f}")
    rows = []
    for method in methods:
        if method == "regmean_plusplus":   # statistics and merge are one pass, block by block
            for count in tasks:
                m = _run([f"--worker=merge_{method}", f"--num_tasks={count}"])
                rows.append({"method": method, "phase": "statistics and merge", "tasks": count, **m})
                print(f"{method:<8} statistics and merge of {count:>2} experts ({images} images each): "
                      f"{m['seconds']:.1f} s, peak {m['peak_gib']:.2f} GiB", flush=True)
            continue
        s = _run([f"--worker=stats_{method}"])
        rows.append({"method": method, "phase": f"statistics of one expert, {images} images", **s})
        print(f"{method:<8} statistics of one expert ({images} images, batch {batch_size}): {s['seconds']:.1f} s, "
              f"peak {s['peak_gib']:.2f} GiB, statistics {s['bytes'] / 2**20:.0f} MiB", flush=True)
        for count in tasks:
            m = _run([f"--worker=merge_{method}", f"--num_tasks={count}"])
            rows.append({"method": method, "phase": "merge", "tasks": count, **m})
            print(f"{method:<8} merge of {count:>2} experts: {m['seconds']:.1f} s, peak {m['peak_gib']:.2f} GiB; "
                  f"statistics + merge ≈ {count} × {s['seconds']:.0f} s + {m['seconds']:.0f} s", flush=True)
    from taskmerge.storage import atomic
    atomic.write_json(os.path.join(cache_dir, "data_aware", "results.json"),
                      {"config": config, "load_average_after": os.getloadavg(), "rows": rows})


if __name__ == "__main__":
    main()
