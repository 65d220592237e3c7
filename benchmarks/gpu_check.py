"""The device check (issue 12 §5): on one GPU, in at most 8 minutes, one table of what the training
loops, the evaluation loader and TSV-M cost there, each against its reference or target.

    python3 benchmarks/gpu_check.py                     # any CUDA machine; torch, torchvision, open_clip
    python3 benchmarks/gpu_check.py --tiny=True --device=cpu    # the same code, tiny, < 60 s on a CPU
    bash benchmarks/run_gpu_check.sh                    # on the device machine (installs open_clip's wheel)

Everything is built here, nothing downloads: random-weight open_clip experts (ViT-B/32, `tasks`
task vectors), random 224-px images, and for the loader row synthetic JPEG files in a temporary
EuroSAT_splits/ folder read by our EuroSAT reader. Rows (the shared measurements are in
_harness.py, the same ones training_speed.py prints on the CPU):
- a layer-wise AdaMerging step (T × 2 batches of 16) vs a plain forward+backward of one model on the
  same images (target ≤ 1.25×), one step at a time and `adamerging_in_a_row` steps back to back;
- Surgery v1: `surgery_iterations` on cached features (features computed once) vs the reference loop
  structure, extrapolated from one timed task-iteration and one task's evaluation (target ≥ 20×),
  for T × images_per_task images and projected to the 8 real test sets;
- SurgeryV2: iterations per second of train_surgery_v2 vs the originals' structure;
- evaluation throughput through runs.evaluation.evaluate and its DataLoader vs the model alone on
  tensors already on the device (bounded by the model: target ≥ 0.9×);
- TSV-M of `tsv_experts` experts with the SVDs on the device vs the CPU path;
- the peak memory of one LW-AdaMerging step and one SurgeryV2 iteration at `large_model` ×
  `large_tasks`, next to the memory plan (memory_plan.py) and 80 GiB.
Peak memory per phase: torch.cuda.max_memory_allocated, reset at the phase's start (on the CPU the
process's peak RSS, reset the same way where Linux allows it). Phases run in this one process, in
order; once `time_budget_s` has passed the remaining ones are skipped, and the table says so.
"""
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# device and numerics
device = "auto"               # "auto": cuda if available, else cpu; or any torch device string
tf32 = False                  # TF32 matmuls/convolutions (fp32 as the originals' code when False)
threads = 0                   # torch CPU threads (0: torch's default)
# the ViT-B/32 setting
model_name = "ViT-B-32"
tasks = 8
batch_size = 16
batches_per_task = 2
num_classes = 10
# AdaMerging
adamerging_steps = 3          # single synchronized steps (median)
adamerging_in_a_row = 20
# Surgery v1 and SurgeryV2
images_per_task = 64
surgery_iterations = 500
eval_every = 100
# module ranks; 0: "auto", the originals' rank for the model (runs.adaptive.surgery_rank: v1 16;
# SurgeryV2 16 for ViT-B/32 and B/16, 4 for ViT-L/14)
surgery_rank = 0
surgery_v2_rank = 0
surgery_v2_iterations = 10    # timed per iteration, first and last left out
reference_task_iterations = 1
reference_eval_batch_size = 256
# real test-set sizes of SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST, DTD (projections)
project_test_sizes = [19887, 8041, 6300, 2700, 26032, 12630, 10000, 1880]
# evaluation throughput
eval_images = 4096
eval_batch_size = 128
num_workers = -1              # DataLoader workers; -1: the runs' default (compute.devices.default_num_workers)
jpeg_size = 256               # synthetic JPEGs are this square size (the transform resizes them)
# TSV-M
tsv_experts = 8
tsv_cpu = True                # also time the CPU path here (the reference)
# the large setting: memory of one step
large_model = "ViT-L-14"
large_tasks = 20
large_rank = 0                # SurgeryV2's rank at large_model (0: "auto")
large_images_per_task = 32
gpu_gib = 80.0
# budget and output
time_budget_s = 450.0         # remaining phases are skipped once this has passed (the check: ≤ 8 min)
tiny = False                  # shrink everything (tiny open_clip model, few images) to run on a CPU
out = ""                      # also write the result here: .json (table + numbers) or markdown

from taskmerge.runs.config import configure  # noqa: E402

config = configure(globals())

# tiny=True: the embedded benchmark's 32-px CLIP, a few images and iterations; explicit overrides win.
TINY = {"model_name": "taskmerge-tiny", "large_model": "taskmerge-tiny", "tasks": 3, "large_tasks": 4,
        "adamerging_steps": 1, "adamerging_in_a_row": 3, "images_per_task": 32, "surgery_iterations": 20,
        "eval_every": 10, "surgery_v2_iterations": 4, "eval_images": 64, "eval_batch_size": 32,
        "num_workers": 2, "jpeg_size": 40, "tsv_experts": 3, "large_images_per_task": 32}
if tiny:
    given = {a[2:].split("=", 1)[0].replace("-", "_") for a in sys.argv[1:] if a.startswith("--")}
    for _key, _value in TINY.items():
        if _key not in given:
            globals()[_key] = _value
            config[_key] = _value

os.environ.setdefault("TQDM_DISABLE", "1")   # the library's progress bars would bury the table

import functools  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import _harness as h  # noqa: E402
import memory_plan  # noqa: E402
from taskmerge.compute.devices import default_num_workers, device_description, resolve_device, use_tf32  # noqa: E402
from taskmerge.adaptive.adamerging import adamerging_step  # noqa: E402
from taskmerge.adaptive.adaptation_data import TaskImages  # noqa: E402
from taskmerge.adaptive.feature_cache import features_of  # noqa: E402
from taskmerge.adaptive.functional_merge import MergedEncoder  # noqa: E402
from taskmerge.adaptive.surgery import SurgeryConfig  # noqa: E402
from taskmerge.adaptive.surgery_v2 import train_surgery_v2  # noqa: E402
from taskmerge.datasets.real import read_eurosat  # noqa: E402
from taskmerge.datasets.templates import EUROSAT_FOLDERS  # noqa: E402
from taskmerge.merging import tsv_merging  # noqa: E402
from taskmerge.models.encoders import build_image_encoder, eval_transform  # noqa: E402
from taskmerge.runs.adaptive import surgery_rank as auto_rank  # noqa: E402
from taskmerge.runs.evaluation import LoaderSettings, evaluate  # noqa: E402
from taskmerge.storage import atomic  # noqa: E402

dev = resolve_device(device)
workers = num_workers if num_workers >= 0 else default_num_workers(dev)
v1_rank = surgery_rank or auto_rank("auto", "v1", model_name)
v2_rank = surgery_v2_rank or auto_rank("auto", "v2", model_name)
v2_large_rank = large_rank or auto_rank("auto", "v2", large_model)
bench = h.Bench(model_name=model_name, tasks=tasks, device=dev, batch_size=batch_size,
                batches_per_task=batches_per_task, images_per_task=images_per_task,
                num_classes=num_classes, rank=v1_rank)


def row(key, what, ours, reference, kind, unit, target="–", note=""):
    """One table row; `ratio` is computed here from the two measured values: `kind` "ours/ref"
    (a slowdown or a rate's speed-up) or "ref/ours" (a time's speed-up)."""
    ratio = ours / reference if kind == "ours/ref" else reference / ours
    return {"key": key, "what": what, "ours": ours, "reference": reference, "ratio": ratio,
            "ratio_kind": kind, "unit": unit, "target": target, "note": note}


# ---------------------------------------------------------------- phases
def phase_adamerging(peak: h.PeakMemory):
    r = h.adamerging_timings(bench, adamerging_steps, adamerging_in_a_row)
    n = r["in_a_row"]
    return [row("adamerging_step", f"LW-AdaMerging step ({tasks} task vectors, {r['images_per_step']} images) "
                "vs plain forward+backward of one model", r["adamerging_step_s"], r["plain_step_s"],
                "ours/ref", "s", "≤ 1.25", f"median of {adamerging_steps}; the merge's forward+backward "
                f"alone {r['merge_fwd_bwd_s']:.3f} s"),
            row("adamerging_in_a_row", f"{n} LW-AdaMerging steps in a row vs {n} plain steps",
                r["adamerging_in_a_row_s"], r["plain_in_a_row_s"], "ours/ref", "s", "≤ 1.25",
                f"{r['adamerging_in_a_row_s'] / n:.3f} s per step")]


def phase_surgery_v1(peak: h.PeakMemory):
    ref = h.surgery_v1_reference(bench, reference_task_iterations)
    ours = h.surgery_v1_ours(bench, surgery_iterations, eval_every)
    small = [images_per_task] * tasks
    rows = []
    for key, sizes, label in (("surgery_v1_run", small, f"{tasks} tasks × {images_per_task} images"),
                              ("surgery_v1_projected", project_test_sizes,
                               f"projected to the 8 real test sets ({sum(project_test_sizes):,} images)")):
        ref_s, ours_s = h.surgery_v1_totals(bench, ref, ours, surgery_iterations, eval_every,
                                            reference_eval_batch_size, sizes)
        rows.append(row(key, f"Surgery v1, {surgery_iterations} iterations, {label}: ours (cached features) "
                        "vs the reference loop structure", ours_s, ref_s, "ref/ours", "s", "≥ 20",
                        f"reference extrapolated from one task-iteration ({ref['task_iteration_s']:.3f} s) "
                        f"and one task's evaluation; ours: features {ours['features_one_task_s']:.3f} s per "
                        f"{images_per_task} images, training {ours['train_all_iterations_s']:.2f} s"))
    return rows


def phase_surgery_v2(peak: h.PeakMemory):
    b = h.Bench(**{**bench.__dict__, "rank": v2_rank})
    ours = h.surgery_v2_ours(b, surgery_v2_iterations)
    ref = h.surgery_v2_reference(b, reference_task_iterations)
    return [row("surgery_v2", f"SurgeryV2 iterations/s (rank {v2_rank}, {tasks} tasks × "
                f"{batches_per_task} steps of {batch_size}) vs the originals' structure",
                1 / ours["iteration_s"], 1 / ref["iteration_s"], "ours/ref", "it/s", "–",
                f"ours: median of {ours['iterations_timed']} iterations of train_surgery_v2; reference: one "
                f"task-iteration × {tasks}")]


def write_jpegs(root: str, n: int, size: int) -> None:
    """EuroSAT_splits/{train,test}/<class>/*.jpg: smooth random images (blurred colour blocks)."""
    rng = np.random.default_rng(0)
    for split, count in (("train", len(EUROSAT_FOLDERS)), ("test", n)):
        for i in range(count):
            cls = EUROSAT_FOLDERS[i % len(EUROSAT_FOLDERS)]
            folder = os.path.join(root, "EuroSAT_splits", split, cls)
            os.makedirs(folder, exist_ok=True)
            block = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
            block.resize((size, size), Image.BICUBIC).save(os.path.join(folder, f"{i:06d}.jpg"), quality=90)


def phase_evaluation(peak: h.PeakMemory):
    encoder = build_image_encoder(model_name).to(dev)
    size = encoder.image_size
    head, = h.random_heads(1, len(EUROSAT_FOLDERS), encoder.feature_dim, dev)
    settings = LoaderSettings.for_device(dev, workers)
    with tempfile.TemporaryDirectory(prefix="gpu_check_jpegs_") as root:
        t_write = time.perf_counter()
        write_jpegs(root, eval_images, jpeg_size)
        t_write = time.perf_counter() - t_write
        dataset = read_eurosat(root, eval_transform(size)).test
        first = h.timed(dev, lambda: evaluate(encoder, head, dataset, eval_batch_size, device=dev, loader=settings))[0]
        second = h.timed(dev, lambda: evaluate(encoder, head, dataset, eval_batch_size, device=dev,
                                               loader=settings))[0]
    x = torch.randn(eval_batch_size, 3, size, size, device=dev)
    batches = -(-eval_images // eval_batch_size)

    @torch.no_grad()
    def model_only():
        for _ in range(batches):
            head(encoder(x)).argmax(dim=-1).cpu()

    model_only()   # warm-up
    t_model = h.timed(dev, model_only)[0]
    return [row("evaluation", f"evaluation img/s, {eval_images} JPEGs through evaluate()'s DataLoader "
                f"({workers} workers) vs the model alone on tensors on the device",
                eval_images / second, batches * eval_batch_size / t_model, "ours/ref", "img/s", "≥ 0.9",
                f"second of two evaluations (first {eval_images / first:.0f} img/s, with worker start); "
                f"{jpeg_size}² JPEGs written in {t_write:.1f} s")]


def phase_tsv(peak: h.PeakMemory):
    b = h.Bench(**{**bench.__dict__, "tasks": tsv_experts})
    _, pre, task_vector, _ = h.random_setup(b)
    experts = {}
    for t in range(tsv_experts):
        tau = task_vector(t)
        experts[f"T{t}"] = {k: pre[k] + tau[k] for k in pre}
        del tau
    t_dev, merged = h.timed(dev, lambda: tsv_merging(pre, experts, 1.0, "TSVM", device=dev))
    note = (f"cited: 56 s on 2 CPU threads on the repository's CPU machine, FusionBench 0.2.33 125 s; CPU path "
            f"here at {torch.get_num_threads()} threads")
    if not tsv_cpu:
        return [row("tsv_m", f"TSV-M, {tsv_experts} experts, SVDs on {dev.type} (no CPU run: tsv_cpu=False) "
                    "vs the cited 56 s", t_dev, 56.0, "ref/ours", "s", "≤ 60 s", note)]
    t_cpu, on_cpu = h.timed(dev, lambda: tsv_merging(pre, experts, 1.0, "TSVM", device=torch.device("cpu")))
    diff = max((merged[k].double() - on_cpu[k].double()).abs().max().item() for k in on_cpu)
    return [row("tsv_m", f"TSV-M, {tsv_experts} experts, SVDs on {dev.type} vs the CPU path (merge only)",
                t_dev, t_cpu, "ref/ours", "s", "≤ 60 s", f"{note}; max |Δ| between the two {diff:.2e}")]


@functools.lru_cache(maxsize=None)
def large_plan() -> dict:
    return memory_plan.plan(large_model, large_tasks, v2_large_rank, auto_rank("auto", "v1", large_model),
                            batch_size, batches_per_task, num_classes, large_tasks * large_images_per_task,
                            str(dev))


def planned_gib(method: str) -> float:
    return memory_plan.total(large_plan()["methods"][method]) / 2**30


def phase_large_adamerging(peak: h.PeakMemory):
    plan = planned_gib("LW-AdaMerging")
    peak.reset()
    encoder = build_image_encoder(large_model)
    pre = {k: v.clone() for k, v in encoder.state_dict().items()}
    g = torch.Generator().manual_seed(7)
    # The same task vector for every task: memory does not depend on the values, and drawing
    # 20 × 342M random numbers would take most of the budget.
    tau = {k: (1e-3 * torch.randn(v.shape, generator=g) if k.startswith("model.visual.") else torch.zeros_like(v))
           for k, v in pre.items()}
    merged = MergedEncoder(encoder, pre, [lambda: tau] * large_tasks, mode="layer", device=dev)
    del tau, pre
    opt = torch.optim.Adam([merged.lam_raw], lr=1e-3)
    heads = h.random_heads(large_tasks, num_classes, encoder.feature_dim, dev)
    size = encoder.image_size

    def batches():
        for t in range(large_tasks):
            for _ in range(batches_per_task):
                yield heads[t], torch.randn(batch_size, 3, size, size, device=dev)

    def step():
        opt.zero_grad(set_to_none=True)
        adamerging_step(merged, batches())
        opt.step()

    t_step = h.timed(dev, step)[0]
    measured = peak.gib()
    return [row("large_adamerging_memory", f"{large_model} × {large_tasks} tasks: peak memory of one "
                f"LW-AdaMerging step ({large_tasks * batches_per_task} batches of {batch_size}) vs the plan",
                measured, plan, "ours/ref", "GiB", f"≤ {gpu_gib:g} GiB", f"step {t_step:.2f} s")]


def phase_large_surgery_v2(peak: h.PeakMemory):
    plan = planned_gib("SurgeryV2")
    torch.manual_seed(1)
    expert = build_image_encoder(large_model)
    size = expert.image_size
    g = torch.Generator().manual_seed(2)
    images = TaskImages.from_tensors(torch.randn(large_images_per_task, 3, size, size, generator=g),
                                     torch.randint(0, num_classes, (large_images_per_task,), generator=g))
    targets = features_of({"expert": expert}, images, batch_size=128, device=dev)["expert"]
    del expert
    peak.reset()
    torch.manual_seed(3)
    base = build_image_encoder(large_model).to(dev)
    base_features = features_of({"base": base}, images, batch_size=128, device=dev)["base"]
    names = [f"T{t}" for t in range(large_tasks)]
    heads = dict(zip(names, h.random_heads(large_tasks, num_classes, base.feature_dim, dev)))
    cfg = SurgeryConfig(rank=v2_large_rank, iterations=1, eval_every=1, batch_size=batch_size,
                        batches_per_task=batches_per_task)
    t_it = h.timed(dev, lambda: train_surgery_v2(names, base, {t: images for t in names}, {t: targets for t in names},
                                                 {t: base_features for t in names}, heads, cfg, device=dev))[0]
    measured = peak.gib()
    return [row("large_surgery_v2_memory", f"{large_model} × {large_tasks} tasks: peak memory of one SurgeryV2 "
                f"iteration (rank {v2_large_rank}, {large_tasks} × {batches_per_task} steps of {batch_size}) vs the plan",
                measured, plan, "ours/ref", "GiB", f"≤ {gpu_gib:g} GiB",
                f"iteration incl. its evaluation {t_it:.2f} s")]


PHASES = [("adamerging", phase_adamerging, ["adamerging_step", "adamerging_in_a_row"]),
          ("surgery_v1", phase_surgery_v1, ["surgery_v1_run", "surgery_v1_projected"]),
          ("surgery_v2", phase_surgery_v2, ["surgery_v2"]),
          ("evaluation", phase_evaluation, ["evaluation"]),
          ("tsv_m", phase_tsv, ["tsv_m"]),
          ("large_adamerging", phase_large_adamerging, ["large_adamerging_memory"]),
          ("large_surgery_v2", phase_large_surgery_v2, ["large_surgery_v2_memory"])]


# ---------------------------------------------------------------- the run and its table
def cell(value: float, unit: str) -> str:
    if unit == "s":
        return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"
    if unit == "GiB":
        return f"{value:.2f} GiB"
    return f"{value:,.1f} {unit}" if value < 100 else f"{value:,.0f} {unit}"


def markdown(rows, peak_kind: str) -> str:
    lines = [f"| what | ours | reference | ratio | target | peak ({peak_kind}) | phase |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r or "skipped" in r:
            lines.append(f"| {r['key']} | – | – | – | – | – | {r.get('error') or r['skipped']} |")
            continue
        lines.append(f"| {r['what']} | {cell(r['ours'], r['unit'])} | {cell(r['reference'], r['unit'])} | "
                     f"{r['ratio']:.2f}× ({r['ratio_kind']}) | {r['target']} | {r['peak_gib']:.2f} GiB | "
                     f"{r['phase_s']:.1f} s |")
    notes = [f"- {r['key']}: {r['note']}" for r in rows if r.get("note")]
    if peak_kind == "peak RSS":
        notes.append("- on the CPU the peak is the whole process's RSS (the interpreter and torch "
                     "included), not comparable with the memory plan's bytes")
    return "\n".join(lines + ([""] + notes if notes else []))


def run_phases(phases, budget_s: float, peak: h.PeakMemory, start: float) -> list[dict]:
    """Each phase's rows with its peak memory and time; a phase that fails gives error rows (one
    out-of-memory must not hide the others), and once `budget_s` has passed since `start` the
    remaining phases give skipped rows."""
    rows = []
    for name, phase, keys in phases:
        elapsed = time.perf_counter() - start
        if elapsed > budget_s:
            reason = f"skipped: the time guard ({budget_s:g} s) had passed at {elapsed:.0f} s"
            print(f"[{elapsed:6.1f} s] {name}: {reason}", flush=True)
            rows += [{"key": k, "skipped": reason} for k in keys]
            continue
        peak.reset()
        t0 = time.perf_counter()
        try:
            got = phase(peak)
        except Exception as e:
            reason = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
            print(f"[{time.perf_counter() - start:6.1f} s] {name}: {reason}", flush=True)
            rows += [{"key": k, "error": reason} for k in keys]
            continue
        phase_s, phase_peak = time.perf_counter() - t0, peak.gib()
        for r in got:
            r.update(peak_gib=phase_peak, phase_s=phase_s, phase=name)
        rows += got
        print(f"[{time.perf_counter() - start:6.1f} s] {name}: done in {phase_s:.1f} s, {peak.kind} "
              f"{phase_peak:.2f} GiB", flush=True)
    return rows


def main():
    start = time.perf_counter()
    if threads:
        torch.set_num_threads(threads)
    use_tf32(tf32)
    described = device_description(dev)
    print(f"config: {json.dumps(config)}")
    print(f"device: {json.dumps(described)}  torch threads: {torch.get_num_threads()}  "
          f"loader workers: {workers}  ranks: Surgery v1 {v1_rank}, SurgeryV2 {v2_rank}, "
          f"SurgeryV2 at {large_model} {v2_large_rank}", flush=True)
    peak = h.PeakMemory(dev)
    rows = run_phases(PHASES, time_budget_s, peak, start)
    total_s = time.perf_counter() - start
    table = markdown(rows, peak.kind)
    print()
    print(table)
    print(f"\ntotal {total_s:.1f} s")
    if out:
        result = {"config": config, "device": described, "tf32": tf32, "loader_workers": workers,
                  "ranks": {"surgery_v1": v1_rank, "surgery_v2": v2_rank, "surgery_v2_large": v2_large_rank},
                  "peak_kind": peak.kind, "rows": rows, "total_s": total_s, "markdown": table}
        if out.endswith(".json"):
            atomic.write_json(out, result)
        else:
            atomic.write_text(out, f"device: {json.dumps(described)}\n\n{table}\n\ntotal {total_s:.1f} s\n")
    if any("error" in r for r in rows):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
