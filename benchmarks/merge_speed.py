"""Wall time and peak memory of the data-free merges on ViT-B/32-size experts, one process per run.

    python benchmarks/merge_speed.py                       # 8, 14 and 20 tasks, every method
    python benchmarks/merge_speed.py --tasks=[8] "--methods=['ties','tsvm']" --threads=1
    python benchmarks/merge_speed.py --tasks=[8] "--methods=['wudi@0','wudi@30']"   # WUDI's 300 steps,
        # projected: t(0) + 10·(t(30) − t(0)) (the A, B precompute, then 300 equal Adam steps)

The experts are built here, nothing is downloaded: the open_clip ViT-B-32 image encoder with random
weights (158 tensors, 113.4M floats, task_vectors' `model.` keys) is θ0, and each expert adds a
seeded structured change to every vision tensor: low rank (2-D) + sparse large entries + dense
noise, so that TIES' trim and TSV's truncation have work to do. The six text-side leftovers keep
exactly zero task vectors, as in real checkpoints. They are written once as safetensors under
`cache_dir` (≈ 0.45 GB per model, 9.5 GB for 20 tasks; keep it out of git) and reused.

Every (method, T) runs in a fresh subprocess that opens the files lazily, merges and saves the
result (safetensors; EMR / TSV-C / TALL in their compact form). Reported: the whole process's wall
time (interpreter start, imports, reads, merge, save), its CPU time (user + sys) and its peak RSS
(`wait4` rusage of that child), next to FusionBench 0.2.33's side-by-side numbers at the same thread
count (8 experts) and the targets.
Experts are read through `checkpoints.open_state_dict`, which preads each tensor and never maps
the files (mapped pages would count in RSS). On a machine shared with other jobs use `threads=1`:
two OpenMP threads on oversubscribed cores spin and run ~2× slower.
"""
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

# what to run
tasks = [8, 14, 20]
methods = ["wa", "ta", "ties", "emr", "tall", "consensus", "tsvm",
           "iso_c", "iso_cts", "wudi", "wudi_closed_form", "cart", "dare_ta", "dare_ties", "pcb"]
threads = 2                 # torch intra-op threads per run (the targets assume 2 CPU cores)
recycle_memory = True       # as the entry scripts: freed buffers stay in the process (allocator.py)
# where the experts live
cache_dir = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".cache")
seed = 0
keep_outputs = False
# internal: set for the child process of one run
worker = ""
num_tasks = 0

from taskmerge.runs.config import configure  # noqa: E402

config = configure(globals())

# FusionBench 0.2.33, 8 experts, whole process: (seconds, GiB). Targets: seconds (≤ 2 GiB each).
# FusionBench 0.2.33 on the same 8 experts, whole process, best of 2, quiet machine of this kind,
# measured side by side at 1 and 2 threads (issue #10, 2026-12-01): {threads: {method: (s, peak GiB)}}.
# Only TIES's peak was measured in that run; the others' peaks are unknown (None).
FUSIONBENCH = {1: {"wa": (14.9, None), "ta": (18.0, None), "ties": (70.1, None), "emr": (42.6, None),
                   "tsvm": (175.7, None)},
               2: {"wa": (12.9, None), "ta": (13.9, None), "ties": (50.8, 22.6), "emr": (36.9, None),
                   "tsvm": (124.9, None)}}
TARGET_S = {"wa": 8, "ta": 8, "ties": 25, "emr": 25, "tall": 25, "tsvm": 60,
            "iso_c": 60, "wudi": 600}  # issue 14: Iso-C ≤ TSV-M; WUDI's 300 Adam steps ≤ 10 min
MAX_TASKS = 20
GENERATOR_VERSION = 1


def expert_path(i: int) -> str:
    return os.path.join(cache_dir, f"expert_{i:02d}.safetensors")


def pretrained_path() -> str:
    return os.path.join(cache_dir, "pretrained.safetensors")


def structured_change(w, g):
    """Low rank (2-D) + 1 % sparse large entries + dense noise, scaled to the tensor's spread."""
    import torch
    scale = float(w.float().std()) if w.numel() > 1 else 0.0
    scale = scale if scale > 0 else 0.02  # LayerNorm gains and zero biases have no spread
    change = 0.01 * scale * torch.randn(w.shape, generator=g)
    sparse = torch.rand(w.shape, generator=g) < 0.01
    change += sparse * (0.2 * scale * torch.randn(w.shape, generator=g))
    if w.ndim == 2:
        rank = 16
        left = torch.randn(w.shape[0], rank, generator=g)
        low_rank = left @ torch.randn(rank, w.shape[1], generator=g)
        change += (0.02 * scale / rank ** 0.5) * low_rank
    return change


def build_experts(count: int) -> None:
    import torch

    from taskmerge.models.encoders import build_image_encoder
    from taskmerge.storage import atomic
    manifest = os.path.join(cache_dir, "manifest.json")
    info = {"version": GENERATOR_VERSION, "seed": seed, "model": "ViT-B-32"}
    have = json.load(open(manifest)) if os.path.exists(manifest) else {}
    if {k: have.get(k) for k in info} != info:
        have = dict(info, experts=0)
    if have.get("experts", 0) >= count and os.path.exists(pretrained_path()):
        return
    torch.manual_seed(seed)
    encoder = build_image_encoder("ViT-B-32")
    theta0 = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    order = {"key_order": json.dumps(list(theta0))}
    if not os.path.exists(pretrained_path()) or have["experts"] == 0:
        atomic.save_safetensors(theta0, pretrained_path(), metadata=order)
    for i in range(have["experts"], count):
        t0 = time.time()
        g = torch.Generator().manual_seed(seed * 1000 + i + 1)
        expert = {k: (v + structured_change(v, g)) if ".visual." in k else v
                  for k, v in theta0.items()}
        atomic.save_safetensors(expert, expert_path(i), metadata=order)
        have["experts"] = i + 1
        atomic.write_json(manifest, have)
        print(f"built expert {i + 1}/{count} in {time.time() - t0:.1f}s", flush=True)


def run_worker() -> None:
    import torch
    torch.set_num_threads(threads)
    from taskmerge import merging
    from taskmerge.storage import atomic
    from taskmerge.storage.allocator import recycle_freed_memory
    if recycle_memory:
        recycle_freed_memory()
    from taskmerge.storage.checkpoints import open_state_dict
    open_reader = open_state_dict
    theta0 = open_reader(pretrained_path())
    experts = {f"task{i:02d}": open_reader(expert_path(i)) for i in range(num_tasks)}
    out_dir = os.path.join(cache_dir, "out")
    out = os.path.join(out_dir, f"{worker}_{num_tasks}.safetensors")
    tall_file = os.path.join(out_dir, f"tall_{num_tasks}.safetensors")
    t0 = time.time()
    if worker == "wa":
        result = merging.weight_averaging(theta0, experts)
    elif worker == "ta":
        result = merging.task_arithmetic(theta0, experts, lam=0.3)
    elif worker == "ties":
        result = merging.ties_merging(theta0, experts, **merging.TIES_PRESETS["ennengyang"])
    elif worker == "emr":
        result = merging.emr_merging(theta0, experts)
    elif worker in ("tsvm", "tsvm2"):
        result = merging.tsv_merging(theta0, experts, alpha=1.0,
                                     method="TSVM" if worker == "tsvm" else "TSVM_2")
    elif worker == "tsvc":
        result = merging.tsv_compress(theta0, experts)
    elif worker == "tall":  # λ_t = 0.4 for every task stands in for the validation choice
        result = merging.tall_masks(theta0, experts, 0.4)
        out = tall_file
    elif worker in ("iso_c", "iso_cts"):
        result = merging.iso_merging(theta0, experts, alpha=1.0, method=worker)
    elif worker in ("wudi", "wudi_closed_form"):
        result = merging.wudi_merging(theta0, experts, solver="adam" if worker == "wudi" else "closed_form")
    elif worker.startswith("wudi@"):  # "wudi@N": N Adam steps, to project 300 from two short runs
        result = merging.wudi_merging(theta0, experts, solver="adam", steps=int(worker[5:]))
    elif worker == "cart":  # the 8-task preset stands in where the repository has none
        result = merging.cart_merging(theta0, experts, **merging.CART_PRESETS.get(num_tasks,
                                                                                  merging.CART_PRESETS[8]))
    elif worker in ("dare_ta", "dare_ties"):
        merge = merging.dare_task_arithmetic if worker == "dare_ta" else merging.dare_ties
        result = merge(theta0, experts, **merging.DARE_PRESETS[f"fusionbench_{worker[5:]}"], seed=seed)
    elif worker == "pcb":
        result = merging.pcb_merging(theta0, experts)
    elif worker == "consensus":  # reads the TALL masks the "tall" run left on disk
        result = merging.consensus_merging(theta0, merging.TallMasks.load(tall_file), alpha=0.3)
    else:
        raise SystemExit(f"unknown method {worker!r}")
    merged_s = time.time() - t0
    if isinstance(result, dict):
        atomic.save_safetensors(result, out, metadata={"method": worker, "tasks": str(num_tasks)})
        storage = None
    else:
        result.save(out)
        storage = result.storage_report()
    print(json.dumps({"merge_s": merged_s, "save_s": time.time() - t0 - merged_s,
                      "output_bytes": os.path.getsize(out), "storage": storage}))


def run_one(method: str, count: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), f"--worker={method}", f"--num_tasks={count}",
           f"--threads={threads}", f"--cache_dir={cache_dir}", f"--recycle_memory={recycle_memory}"]
    t0 = time.time()
    # scipy's LAPACK (TSV's partial eigensolver) has its own thread pool: hold it to `threads` too
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - t0
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{method} with {count} tasks failed:\n{stderr[-3000:]}")
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    report = json.loads(lines[-1])
    report.update(method=method, tasks=count, wall_s=wall, cpu_s=usage.ru_utime + usage.ru_stime,
                  peak_rss_gib=usage.ru_maxrss / 2**20, load_average=os.getloadavg()[0])
    if not keep_outputs and method != "tall":
        out = os.path.join(cache_dir, "out", f"{method}_{count}.safetensors")
        if os.path.exists(out):
            os.remove(out)
    return report


def main() -> None:
    if worker == "build":
        return build_experts(num_tasks)
    if worker:
        return run_worker()
    os.makedirs(cache_dir, exist_ok=True)
    # in a child: Linux keeps a process's peak RSS across fork + exec, so experts built in this
    # process would set every later run's reported peak (2.5 GiB at 14 tasks, whatever the method)
    subprocess.run([sys.executable, os.path.abspath(__file__), "--worker=build", f"--num_tasks={max(tasks)}",
                    f"--cache_dir={cache_dir}", f"--seed={seed}"], check=True)
    print(f"torch threads per run: {threads}; cpu count: {os.cpu_count()}; "
          f"freed memory recycled: {recycle_memory}; "
          f"load average before: {os.getloadavg()[0]:.2f}")
    rows = []
    header = (f"{'method':<10}{'tasks':>6}{'wall s':>9}{'merge s':>9}{'cpu s':>8}{'peak GiB':>10}"
              f"{'FB s':>7}{'FB GiB':>8}{'target s':>10}{'load':>6}")
    print(header)
    for count in tasks:
        for method in methods:
            tall_file = os.path.join(cache_dir, "out", f"tall_{count}.safetensors")
            if method == "consensus" and "tall" not in methods and not os.path.exists(tall_file):
                print(f"consensus {count}: needs the TALL masks of a 'tall' run; skipped")
                continue
            r = run_one(method, count)
            rows.append(r)
            fb = FUSIONBENCH.get(threads, {}).get(method) if count == 8 else None
            fb_s, fb_gib = fb if fb else ("", "")
            print(f"{method:<10}{count:>6}{r['wall_s']:>9.1f}{r['merge_s']:>9.1f}{r['cpu_s']:>8.1f}"
                  f"{r['peak_rss_gib']:>10.2f}{fb_s:>7}{'' if fb_gib is None else fb_gib:>8}"
                  f"{TARGET_S.get(method, ''):>10}{r['load_average']:>6.1f}", flush=True)
    from taskmerge.storage import atomic
    atomic.write_json(os.path.join(cache_dir, "results.json"),
                      {"config": config, "load_average_after": os.getloadavg(), "rows": rows})


if __name__ == "__main__":
    main()
