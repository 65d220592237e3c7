"""Training speed of AdaMerging, Surgery v1 and SurgeryV2, on random weights and random images.

    python benchmarks/training_speed.py [--model_name=ViT-B-32] [--tasks=8] [--device=cuda] ...

Prints, each phase in its own process (so that peak RSS is per phase):
1. AdaMerging: one step (tasks × batches_per_task batches of batch_size, layer-wise λ over
   `tasks` stacked task vectors) vs a plain forward+backward of one model on the same images.
   Target: ratio ≤ 1.25.
2. Surgery v1: ours (features of base and expert computed once, then `surgery_iterations`
   iterations on cached features) vs a faithful re-creation of the reference loop structure
   (merge θ0 + Σ α τ on every forward with requires_grad on all nine copies, reload the expert
   checkpoint from disk every task-iteration, re-create dataset + shuffled loader every step, full
   evaluation with a merge per forward every eval_every iterations). The reference is timed for
   `reference_task_iterations` task-iterations and one task's evaluation, and extrapolated; the
   totals are also projected to the real 8 tasks' test-set sizes from the measured per-image costs.
3. SurgeryV2: time per iteration of train_surgery_v2 (tasks × 2 steps through the merged model with
   deep modules), the benchmarks' shared measurement (_harness.py).
"""
import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# model and data
model_name = "ViT-B-32"
tasks = 8
batch_size = 16
batches_per_task = 2
images_per_task = 32          # test images per task for the Surgery timings
num_classes = 10
# schedule
adamerging_steps = 1          # timed steps (after a one-batch warm-up)
surgery_iterations = 500
eval_every = 100
reference_eval_batch_size = 256   # RepresentationSurgery's eval batch
reference_task_iterations = 1
surgery_v2_iterations = 4    # timed by train_surgery_v2's on_step: first and last left out
rank = 16
# real test-set sizes of SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST, DTD (for projections)
project_test_sizes = [19887, 8041, 6300, 2700, 26032, 12630, 10000, 1880]
# machine
device = "cpu"
threads = 0                   # 0: torch's default
phase = "all"                 # all | adamerging | surgery_v1 | surgery_v2

from taskmerge.runs.config import configure  # noqa: E402

config = configure(globals())

import torch  # noqa: E402

import _harness as h  # noqa: E402
from taskmerge.compute.devices import resolve_device  # noqa: E402

bench = h.Bench(model_name=model_name, tasks=tasks, device=resolve_device(device), batch_size=batch_size,
                batches_per_task=batches_per_task, images_per_task=images_per_task,
                num_classes=num_classes, rank=rank)


def run_adamerging():
    out = h.adamerging_timings(bench, adamerging_steps)
    out["plain_steps_s"] = [round(t, 2) for t in out["plain_steps_s"]]
    out["adamerging_steps_s"] = [round(t, 2) for t in out["adamerging_steps_s"]]
    return out


def run_surgery_v1_reference():
    return h.surgery_v1_reference(bench, reference_task_iterations)


def run_surgery_v1_ours():
    return h.surgery_v1_ours(bench, surgery_iterations, eval_every)


def surgery_v1_totals(ref, ours):
    return (h.surgery_v1_totals(bench, ref, ours, surgery_iterations, eval_every, reference_eval_batch_size,
                                [images_per_task] * tasks),
            h.surgery_v1_totals(bench, ref, ours, surgery_iterations, eval_every, reference_eval_batch_size,
                                project_test_sizes))


def run_surgery_v2():
    out = h.surgery_v2_ours(bench, surgery_v2_iterations)
    out["task_iteration_s"] = out["iteration_s"] / tasks
    return out


PHASES = {"adamerging": run_adamerging, "surgery_v1_reference": run_surgery_v1_reference,
          "surgery_v1_ours": run_surgery_v1_ours, "surgery_v2": run_surgery_v2}


def main():
    if threads:
        torch.set_num_threads(threads)
    if phase != "all":
        result = PHASES[phase]()
        result["peak_rss_gib"] = h.peak_rss_gib()
        print("RESULT " + json.dumps(result))
        return
    args = [a for a in sys.argv[1:] if not a.startswith("--phase=")]
    results = {}
    for name in PHASES:
        out = subprocess.run([sys.executable, os.path.abspath(__file__), f"--phase={name}", *args],
                             capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            print(out.stdout[-2000:], out.stderr[-4000:])
            raise SystemExit(f"phase {name} failed")
        results[name] = json.loads(lines[-1][7:])
    a, r, o, v = (results[k] for k in PHASES)
    (ref_s, ours_s), (ref_p, ours_p) = surgery_v1_totals(r, o)
    print(f"config: {json.dumps(config)}  torch threads: {torch.get_num_threads()}")
    print(f"AdaMerging step ({a['images_per_step']} images, layer-wise, {tasks} task vectors): "
          f"{a['adamerging_step_s']:.2f} s vs plain forward+backward {a['plain_step_s']:.2f} s "
          f"-> ratio {a['ratio']:.3f} (steps {a['adamerging_steps_s']} vs {a['plain_steps_s']}; merge fwd+bwd "
          f"alone {a['merge_fwd_bwd_s']:.2f} s); peak RSS {a['peak_rss_gib']:.1f} GiB")
    print(f"Surgery v1 reference structure: task-iteration {r['task_iteration_s']:.2f} s, merge "
          f"{r['merge_s']:.2f} s, eval forward {r['eval_forward_per_image_s']:.3f} s/image; "
          f"peak RSS {r['peak_rss_gib']:.1f} GiB")
    print(f"Surgery v1 ours: base+expert features {o['features_one_task_s']:.2f} s per task "
          f"({images_per_task} images), {surgery_iterations} iterations on cached features "
          f"{o['train_all_iterations_s']:.1f} s; peak RSS {o['peak_rss_gib']:.1f} GiB")
    print(f"Surgery v1 whole run, {tasks} tasks x {images_per_task} images: reference {ref_s:.0f} s vs ours "
          f"{ours_s:.1f} s -> ratio {ref_s / ours_s:.1f}")
    print(f"Surgery v1 whole run projected to the real test sets ({sum(project_test_sizes)} images): "
          f"reference {ref_p:.0f} s vs ours {ours_p:.0f} s -> ratio {ref_p / ours_p:.1f}")
    print(f"SurgeryV2 (rank {rank}, {v['params_per_task']} parameters per task): {v['iteration_s']:.2f} s per "
          f"iteration ({tasks} tasks x {batches_per_task} steps of {batch_size}); peak RSS {v['peak_rss_gib']:.1f} GiB")


if __name__ == "__main__":
    main()
