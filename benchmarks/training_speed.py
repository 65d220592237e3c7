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
3. SurgeryV2: time per iteration (tasks × 2 steps through the merged model with deep modules).
"""
import atexit
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

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
rank = 16
# real test-set sizes of SUN397, Cars, RESISC45, EuroSAT, SVHN, GTSRB, MNIST, DTD (for projections)
project_test_sizes = [19887, 8041, 6300, 2700, 26032, 12630, 10000, 1880]
# machine
device = "cpu"
threads = 0                   # 0: torch's default
phase = "all"                 # all | adamerging | surgery_v1 | surgery_v2

from taskmerge.runs.config import configure  # noqa: E402

config = configure(globals())

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torch.func import functional_call  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from taskmerge.adaptive.adamerging import adamerging_step, entropy  # noqa: E402
from taskmerge.adaptive.adaptation_data import TaskImages  # noqa: E402
from taskmerge.adaptive.feature_cache import features_of  # noqa: E402
from taskmerge.adaptive.functional_merge import MergedEncoder  # noqa: E402
from taskmerge.adaptive.surgery import SurgeryConfig, train_surgery  # noqa: E402
from taskmerge.adaptive.surgery_modules import SurgeryAdapter, deep_forward, make_deep_adapters  # noqa: E402
from taskmerge.datasets.base import ArrayDataset  # noqa: E402
from taskmerge.models.encoders import build_image_encoder, eval_transform  # noqa: E402
from taskmerge.models.heads import ClassificationHead  # noqa: E402
from taskmerge.storage import atomic  # noqa: E402


def sync():
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t, out


def peak_rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def random_setup():
    torch.manual_seed(0)
    encoder = build_image_encoder(model_name)
    pre = {k: v.clone() for k, v in encoder.state_dict().items()}

    def task_vector(t):
        g = torch.Generator().manual_seed(100 + t)
        return {k: (1e-3 * torch.randn(v.shape, generator=g) if k.startswith("model.visual.")
                    else torch.zeros_like(v)) for k, v in pre.items()}

    heads = []
    for _ in range(tasks):
        w = torch.randn(num_classes, encoder.feature_dim)
        heads.append(ClassificationHead(100 * w / w.norm(dim=1, keepdim=True)).to(device))
    return encoder, pre, task_vector, heads


def run_adamerging():
    encoder, pre, task_vector, heads = random_setup()
    merged = MergedEncoder(encoder, pre, [lambda t=t: task_vector(t) for t in range(tasks)], mode="layer").to(device)
    opt = torch.optim.Adam([merged.lam_raw], lr=1e-3)
    plain = build_image_encoder(model_name, pre).to(device).requires_grad_(True)
    size = encoder.image_size
    images = [[torch.randn(batch_size, 3, size, size).to(device) for _ in range(batches_per_task)]
              for _ in range(tasks)]

    def plain_step(n=None):
        for i, (t, x) in enumerate((t, x) for t in range(tasks) for x in images[t]):
            if n is not None and i >= n:
                break
            entropy(heads[t](plain(x))).mean().backward()
        plain.zero_grad(set_to_none=True)

    def ada_step(n=None):
        batches = [(heads[t], x) for t in range(tasks) for x in images[t]][:n]
        opt.zero_grad(set_to_none=True)
        adamerging_step(merged, batches)
        opt.step()

    plain_step(1), ada_step(1)    # warm-up
    t_plain, t_ada = [], []
    for _ in range(adamerging_steps):
        t_plain.append(timed(plain_step)[0])
        t_ada.append(timed(ada_step)[0])
    # The merge alone (forward + backward through θ(λ)), the only work a plain step does not do.
    theta = merged.merge(merged.forward_names)
    t_merge = timed(lambda: torch.autograd.backward(list(theta.values()),
                                                    [torch.ones_like(v) for v in theta.values()]))[0]
    t_merge += timed(lambda: merged.merge(merged.forward_names))[0]
    return {"plain_step_s": statistics.median(t_plain), "adamerging_step_s": statistics.median(t_ada),
            "plain_steps_s": [round(t, 2) for t in t_plain], "adamerging_steps_s": [round(t, 2) for t in t_ada],
            "ratio": statistics.median(t_ada) / statistics.median(t_plain), "merge_fwd_bwd_s": t_merge,
            "images_per_step": tasks * batches_per_task * batch_size}


class ReferenceMerged(torch.nn.Module):
    """The originals' merged model: every forward merges θ0 and the task vectors on the CPU from
    tensors that all require grad, then moves the result to the device (METHODS.md §1.5)."""

    def __init__(self, encoder, paramslist, alpha):
        super().__init__()
        self.encoder, self.paramslist, self.alpha = encoder, paramslist, alpha
        self.names = list(encoder.state_dict().keys())

    def merge(self):
        return {n: sum(p[j] * a for p, a in zip(self.paramslist, self.alpha)).to(device)
                for j, n in enumerate(self.names)}

    def forward(self, x):
        return functional_call(self.encoder, self.merge(), (x,))


def surgery_inputs():
    encoder, pre, task_vector, heads = random_setup()
    size = encoder.image_size
    folder = tempfile.mkdtemp(prefix="surgery_bench_")
    atexit.register(shutil.rmtree, folder, True)
    expert_path = os.path.join(folder, "finetuned.pt")
    tau0 = task_vector(0)
    atomic.torch_save({k: pre[k] + tau0[k] for k in pre}, expert_path)
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (images_per_task, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, num_classes, images_per_task)
    return encoder, pre, task_vector, heads, expert_path, raw, labels, eval_transform(size)


def run_surgery_v1_reference():
    """Timings of one task-iteration and of one task's evaluation in the reference structure."""
    encoder, pre, task_vector, heads, expert_path, raw, labels, transform = surgery_inputs()
    paramslist = [tuple(v.clone().requires_grad_() for v in pre.values())]
    paramslist += [tuple(tau[k].clone().requires_grad_() for k in pre)
                   for tau in (task_vector(t) for t in range(tasks))]
    ref = ReferenceMerged(build_image_encoder(model_name).to(device).requires_grad_(False), paramslist,
                          [1.0] + [0.3] * tasks)
    adapter = SurgeryAdapter(encoder.feature_dim, rank).to(device)
    opt = torch.optim.Adam(adapter.parameters(), lr=1e-3)

    def task_iteration():
        dataset = ArrayDataset(raw, labels, transform)               # re-created every step
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=0)
        state = torch.load(expert_path, map_location="cpu", weights_only=True)   # reloaded every step
        expert = build_image_encoder(model_name, state).to(device)
        for i, (x, _) in enumerate(loader):
            if i >= batches_per_task:
                break
            x = x.to(device)
            z = adapter(ref(x))
            with torch.no_grad():
                z_ft = expert(x)
            loss = F.l1_loss(z, z_ft)
            opt.zero_grad()
            loss.backward()       # through the whole model into the nine requires-grad copies
            opt.step()

    x_eval = torch.stack([transform(Image.fromarray(im)) for im in raw]).to(device)
    with torch.no_grad():
        ref.merge()                                            # warm-up (first touch of the memory)
        t_merge = statistics.median(timed(ref.merge)[0] for _ in range(2))
        fixed = ref.merge()
        t_fwd = timed(lambda: heads[0](adapter(functional_call(ref.encoder, fixed, (x_eval,)))))[0]
        del fixed
    t_task = statistics.median(timed(task_iteration)[0] for _ in range(reference_task_iterations))
    return {"task_iteration_s": t_task, "merge_s": t_merge, "eval_forward_per_image_s": t_fwd / images_per_task}


def run_surgery_v1_ours():
    encoder, pre, task_vector, heads, expert_path, raw, labels, transform = surgery_inputs()
    tau0 = task_vector(0)
    base = build_image_encoder(model_name, {k: pre[k] + 0.3 * tau0[k] for k in pre}).to(device)
    images = TaskImages(ArrayDataset(raw, labels, transform), preload=False)
    load_expert = lambda: build_image_encoder(  # noqa: E731
        model_name, torch.load(expert_path, map_location="cpu", weights_only=True))
    t_feat, feats = timed(lambda: features_of({"base": base, "expert": load_expert()}, images,
                                              batch_size=128, device=device))
    names = [f"T{t}" for t in range(tasks)]
    cfg = SurgeryConfig(rank=rank, iterations=surgery_iterations, eval_every=eval_every,
                        batch_size=batch_size, batches_per_task=batches_per_task)
    t_train = timed(lambda: train_surgery(
        names, {t: feats["base"]["final"] for t in names}, {t: feats["expert"]["final"] for t in names},
        {t: torch.as_tensor(labels) for t in names}, {t: heads[i] for i, t in enumerate(names)}, cfg,
        device=device))[0]
    return {"features_one_task_s": t_feat, "train_all_iterations_s": t_train}


def surgery_v1_totals(ref, ours):
    """Whole-run times: the reference's task-iteration cost does not depend on N; its evaluation
    (a merge per forward batch of 256, then the forward) and our one feature pass scale with N."""
    rounds = surgery_iterations // eval_every + 1          # step 0 and every eval_every

    def totals(sizes):
        ref_s = surgery_iterations * len(sizes) * ref["task_iteration_s"] + rounds * sum(
            -(-n // reference_eval_batch_size) * ref["merge_s"] + n * ref["eval_forward_per_image_s"]
            for n in sizes)
        ours_s = sum(sizes) * ours["features_one_task_s"] / images_per_task + ours["train_all_iterations_s"]
        return ref_s, ours_s

    return totals([images_per_task] * tasks), totals(project_test_sizes)


def run_surgery_v2():
    encoder, pre, task_vector, heads = random_setup()
    tau0 = task_vector(0)
    base = build_image_encoder(model_name, {k: pre[k] + 0.3 * tau0[k] for k in pre}).to(device)
    base.requires_grad_(False)
    size = encoder.image_size
    x_all = torch.randn(images_per_task, 3, size, size)
    adapters = make_deep_adapters([f"T{t}" for t in range(tasks)], base, rank).to(device)
    with torch.no_grad():
        hidden, z = deep_forward(base, x_all[:batch_size].to(device))
    h_ft = [h.half() for h in hidden]
    opt = torch.optim.Adam(adapters.parameters(), lr=1e-3)

    def one_task_iteration(task="T0"):
        for _ in range(batches_per_task):
            idx = torch.randperm(images_per_task)[:batch_size]
            hidden, zc = deep_forward(base, x_all[idx].to(device), adapters[task])
            loss = sum(F.l1_loss(h, t.float()) for h, t in zip(hidden, h_ft)) + F.l1_loss(zc, z)
            opt.zero_grad()
            loss.backward()
            opt.step()

    one_task_iteration()   # warm-up
    t_task = timed(one_task_iteration)[0]
    params = sum(p.numel() for p in adapters["T0"].parameters())
    return {"iteration_s": tasks * t_task, "task_iteration_s": t_task, "params_per_task": params}


PHASES = {"adamerging": run_adamerging, "surgery_v1_reference": run_surgery_v1_reference,
          "surgery_v1_ours": run_surgery_v1_ours, "surgery_v2": run_surgery_v2}


def main():
    if threads:
        torch.set_num_threads(threads)
    if phase != "all":
        result = PHASES[phase]()
        result["peak_rss_gib"] = peak_rss_gib()
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
