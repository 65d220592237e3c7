"""What the training benchmarks share: random ViT experts, timers and peak-memory readings on any
device, the originals' merged model (a merge on every forward), and the AdaMerging, Surgery v1 and
SurgeryV2 measurements that `training_speed.py` (CPU, one process per phase) and `gpu_check.py`
(one table, GPU first) both report. Nothing here downloads: open_clip builds random weights.
"""
from __future__ import annotations

import gc
import os
import resource
import statistics
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.func import functional_call
from torch.utils.data import DataLoader

from taskmerge.adaptive.adamerging import adamerging_step, entropy
from taskmerge.adaptive.adaptation_data import TaskImages
from taskmerge.adaptive.feature_cache import features_of
from taskmerge.adaptive.functional_merge import MergedEncoder
from taskmerge.adaptive.surgery import SurgeryConfig, train_surgery
from taskmerge.adaptive.surgery_modules import SurgeryAdapter, deep_forward, make_deep_adapters
from taskmerge.adaptive.surgery_v2 import train_surgery_v2
from taskmerge.datasets.base import ArrayDataset
from taskmerge.models.encoders import build_image_encoder, eval_transform
from taskmerge.models.heads import ClassificationHead
from taskmerge.storage import atomic


@dataclass
class Bench:
    """The size of one benchmark setting; `device` is a resolved torch.device."""
    model_name: str
    tasks: int
    device: torch.device
    batch_size: int = 16
    batches_per_task: int = 2
    images_per_task: int = 32
    num_classes: int = 10
    rank: int = 16

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


# ---------------------------------------------------------------- timing and memory
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, fn):
    """(seconds, result) of fn(), with the device's queued work finished on both sides."""
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t, out


def peak_rss_gib() -> float:
    """The process's peak RSS (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class PeakMemory:
    """Peak memory of the code run since `reset()`: on CUDA torch's allocator peak
    (max_memory_allocated); on the CPU the process's peak RSS, reset through /proc/self/clear_refs
    where Linux allows it (then it starts from the memory the process already holds, including
    what earlier work freed but the C allocator kept)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "GPU max allocated" if device.type == "cuda" else "peak RSS"

    def reset(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass   # no reset: the reading is the process's peak so far

    def gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 2**20
        except OSError:
            pass
        return peak_rss_gib()


# ---------------------------------------------------------------- random experts
def random_setup(b: Bench):
    """(encoder, θ0, task_vector(t), heads): a random-weight encoder, seeded small task vectors on
    the vision tower (the text leftovers stay exactly zero, as in real checkpoints), random
    normalized heads of `num_classes` on the device."""
    torch.manual_seed(0)
    encoder = build_image_encoder(b.model_name)
    pre = {k: v.clone() for k, v in encoder.state_dict().items()}

    # One seeded draw per tensor, shared: task t's vector is that noise rolled by t·7919 places.
    # The tasks differ, and T vectors cost one draw (CPU random numbers are serial, ~6 s per 342M).
    noise, g = {}, torch.Generator().manual_seed(100)

    def task_vector(t):
        tau = {}
        for k, v in pre.items():
            if not k.startswith("model.visual."):
                tau[k] = torch.zeros_like(v)
                continue
            if k not in noise:
                noise[k] = torch.randn(v.numel(), generator=g)
            tau[k] = (1e-3 * noise[k].roll(t * 7919)).view(v.shape)
        return tau

    return encoder, pre, task_vector, random_heads(b.tasks, b.num_classes, encoder.feature_dim, b.device)


def random_heads(n: int, num_classes: int, dim: int, device: torch.device) -> list[ClassificationHead]:
    """n heads with random unit class embeddings × 100 (CLIP's logit scale), from the global RNG."""
    heads = []
    for _ in range(n):
        w = torch.randn(num_classes, dim)
        heads.append(ClassificationHead(100 * w / w.norm(dim=1, keepdim=True)).to(device))
    return heads


class ReferenceMerged(torch.nn.Module):
    """The originals' merged model: every forward merges θ0 and the task vectors on the CPU from
    tensors that all require grad, then moves the result to the device (METHODS.md §1.5).
    `forward(x, adapters)` runs SurgeryV2's deep forward instead of encode_image."""

    def __init__(self, encoder, paramslist, alpha, device):
        super().__init__()
        self.encoder, self.paramslist, self.alpha, self.device = encoder, paramslist, alpha, device
        self.names = list(encoder.state_dict().keys())

    def merge(self):
        return {n: sum(p[j] * a for p, a in zip(self.paramslist, self.alpha)).to(self.device)
                for j, n in enumerate(self.names)}

    def forward(self, x, adapters=None):
        if adapters is None:
            return functional_call(self.encoder, self.merge(), (x,))
        return functional_call(_DeepForward(self.encoder, adapters), {
            f"encoder.{k}": v for k, v in self.merge().items()}, (x,))


class _DeepForward(torch.nn.Module):
    def __init__(self, encoder, adapters):
        super().__init__()
        self.encoder, self.adapters = encoder, adapters

    def forward(self, x):
        return deep_forward(self.encoder, x, self.adapters)


def reference_model(b: Bench, pre, task_vector) -> ReferenceMerged:
    """θ0 and the T task vectors as T + 1 requires-grad copies, Task Arithmetic's α = 0.3."""
    paramslist = [tuple(v.clone().requires_grad_() for v in pre.values())]
    paramslist += [tuple(tau[k].clone().requires_grad_() for k in pre)
                   for tau in (task_vector(t) for t in range(b.tasks))]
    return ReferenceMerged(build_image_encoder(b.model_name).to(b.device).requires_grad_(False),
                           paramslist, [1.0] + [0.3] * b.tasks, b.device)


def surgery_inputs(b: Bench, folder: str):
    """random_setup plus task 0's expert saved in `folder` and random uint8 test images + labels."""
    encoder, pre, task_vector, heads = random_setup(b)
    size = encoder.image_size
    expert_path = os.path.join(folder, "finetuned.pt")
    tau0 = task_vector(0)
    atomic.torch_save({k: pre[k] + tau0[k] for k in pre}, expert_path)
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (b.images_per_task, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, b.num_classes, b.images_per_task)
    return encoder, pre, task_vector, heads, expert_path, raw, labels, eval_transform(size)


def base_encoder(b: Bench, pre, task_vector):
    """The fixed merged encoder Surgery starts from (θ0 + 0.3 τ_0; the values do not matter here)."""
    tau0 = task_vector(0)
    return build_image_encoder(b.model_name, {k: pre[k] + 0.3 * tau0[k] for k in pre}).to(b.device)


# ---------------------------------------------------------------- AdaMerging
def adamerging_timings(b: Bench, steps: int, in_a_row: int = 0) -> dict:
    """A layer-wise AdaMerging step (adamerging_step + Adam over T stacked task vectors, T ×
    batches_per_task batches) against a plain forward+backward of one model on the same images:
    `steps` single steps each (synchronized one by one), and `in_a_row` steps back to back."""
    encoder, pre, task_vector, heads = random_setup(b)
    merged = MergedEncoder(encoder, pre, [lambda t=t: task_vector(t) for t in range(b.tasks)],
                           mode="layer", device=b.device)
    opt = torch.optim.Adam([merged.lam_raw], lr=1e-3)
    plain = build_image_encoder(b.model_name, pre).to(b.device).requires_grad_(True)
    size = encoder.image_size
    images = [[torch.randn(b.batch_size, 3, size, size).to(b.device) for _ in range(b.batches_per_task)]
              for _ in range(b.tasks)]
    batches = [(heads[t], x) for t in range(b.tasks) for x in images[t]]

    def plain_step(n=None):
        for head, x in batches[:n]:
            entropy(head(plain(x))).mean().backward()
        plain.zero_grad(set_to_none=True)

    def ada_step(n=None):
        opt.zero_grad(set_to_none=True)
        adamerging_step(merged, batches[:n])
        opt.step()

    plain_step(1), ada_step(1)    # warm-up
    t_plain, t_ada = [], []
    for _ in range(steps):
        t_plain.append(timed(b.device, plain_step)[0])
        t_ada.append(timed(b.device, ada_step)[0])
    out = {"plain_step_s": statistics.median(t_plain), "adamerging_step_s": statistics.median(t_ada),
           "plain_steps_s": t_plain, "adamerging_steps_s": t_ada,
           "images_per_step": len(batches) * b.batch_size}
    out["ratio"] = out["adamerging_step_s"] / out["plain_step_s"]
    if in_a_row:
        out["in_a_row"] = in_a_row
        out["adamerging_in_a_row_s"] = timed(b.device, lambda: [ada_step() for _ in range(in_a_row)])[0]
        out["plain_in_a_row_s"] = timed(b.device, lambda: [plain_step() for _ in range(in_a_row)])[0]
    # The merge alone (forward + backward through θ(λ)), the only work a plain step does not do.
    theta = merged.merge(merged.forward_names)
    t_merge = timed(b.device, lambda: torch.autograd.backward(
        list(theta.values()), [torch.ones_like(v) for v in theta.values()]))[0]
    out["merge_fwd_bwd_s"] = t_merge + timed(b.device, lambda: merged.merge(merged.forward_names))[0]
    return out


# ---------------------------------------------------------------- Surgery v1
def surgery_v1_reference(b: Bench, task_iterations: int = 1) -> dict:
    """One task-iteration and one task's evaluation in the reference loop structure: the dataset
    and a shuffled loader re-created and the expert reloaded from disk every task-iteration, a
    merge of the T + 1 requires-grad copies on every forward, backward through all of them."""
    with tempfile.TemporaryDirectory(prefix="surgery_bench_") as folder:
        encoder, pre, task_vector, heads, expert_path, raw, labels, transform = surgery_inputs(b, folder)
        ref = reference_model(b, pre, task_vector)
        adapter = SurgeryAdapter(encoder.feature_dim, b.rank).to(b.device)
        opt = torch.optim.Adam(adapter.parameters(), lr=1e-3)

        def task_iteration():
            dataset = ArrayDataset(raw, labels, transform)               # re-created every step
            loader = DataLoader(dataset, batch_size=b.batch_size, shuffle=True, num_workers=0)
            state = torch.load(expert_path, map_location="cpu", weights_only=True)   # reloaded every step
            expert = build_image_encoder(b.model_name, state).to(b.device)
            for i, (x, _) in enumerate(loader):
                if i >= b.batches_per_task:
                    break
                x = x.to(b.device)
                z = adapter(ref(x))
                with torch.no_grad():
                    z_ft = expert(x)
                loss = F.l1_loss(z, z_ft)
                opt.zero_grad()
                loss.backward()       # through the whole model into the T + 1 requires-grad copies
                opt.step()

        x_eval = torch.stack([transform(Image.fromarray(im)) for im in raw]).to(b.device)
        with torch.no_grad():
            ref.merge()                                        # warm-up (first touch of the memory)
            t_merge = statistics.median(timed(b.device, ref.merge)[0] for _ in range(2))
            fixed = ref.merge()
            t_fwd = timed(b.device, lambda: heads[0](adapter(functional_call(ref.encoder, fixed, (x_eval,)))))[0]
            del fixed
        t_task = statistics.median(timed(b.device, task_iteration)[0] for _ in range(task_iterations))
    return {"task_iteration_s": t_task, "merge_s": t_merge,
            "eval_forward_per_image_s": t_fwd / b.images_per_task}


def surgery_v1_ours(b: Bench, iterations: int, eval_every: int) -> dict:
    """Ours: base and expert features computed once (one task's images), then `iterations` of
    train_surgery on the cached features for T tasks (the same features for every task)."""
    with tempfile.TemporaryDirectory(prefix="surgery_bench_") as folder:
        _, pre, task_vector, heads, expert_path, raw, labels, transform = surgery_inputs(b, folder)
        base = base_encoder(b, pre, task_vector)
        images = TaskImages(ArrayDataset(raw, labels, transform), preload=False)
        load_expert = lambda: build_image_encoder(  # noqa: E731
            b.model_name, torch.load(expert_path, map_location="cpu", weights_only=True))
        t_feat, feats = timed(b.device, lambda: features_of(
            {"base": base, "expert": load_expert()}, images, batch_size=128, device=b.device))
    names = [f"T{t}" for t in range(b.tasks)]
    cfg = SurgeryConfig(rank=b.rank, iterations=iterations, eval_every=eval_every,
                        batch_size=b.batch_size, batches_per_task=b.batches_per_task)
    t_train = timed(b.device, lambda: train_surgery(
        names, {t: feats["base"]["final"] for t in names}, {t: feats["expert"]["final"] for t in names},
        {t: torch.as_tensor(labels) for t in names}, {t: heads[i] for i, t in enumerate(names)}, cfg,
        device=b.device))[0]
    return {"features_one_task_s": t_feat, "train_all_iterations_s": t_train}


def surgery_v1_totals(b: Bench, ref: dict, ours: dict, iterations: int, eval_every: int,
                      reference_eval_batch_size: int, test_sizes) -> tuple[float, float]:
    """(reference s, ours s) of whole runs over tasks of `test_sizes` images: the reference's
    task-iteration cost does not depend on N; its evaluation (a merge per forward batch of 256,
    then the forward) and our one feature pass scale with N."""
    rounds = iterations // eval_every + 1          # step 0 and every eval_every
    ref_s = iterations * len(test_sizes) * ref["task_iteration_s"] + rounds * sum(
        -(-n // reference_eval_batch_size) * ref["merge_s"] + n * ref["eval_forward_per_image_s"]
        for n in test_sizes)
    ours_s = sum(test_sizes) * ours["features_one_task_s"] / b.images_per_task + ours["train_all_iterations_s"]
    return ref_s, ours_s


# ---------------------------------------------------------------- SurgeryV2
def surgery_v2_ours(b: Bench, iterations: int) -> dict:
    """train_surgery_v2 itself over T tasks (the same images and expert targets for every task),
    timed per iteration by its on_step callback; the first iteration is a warm-up and the last
    one, which ends with the full evaluation, is left out of the iteration time."""
    encoder, pre, task_vector, heads = random_setup(b)
    base = base_encoder(b, pre, task_vector)
    expert = build_image_encoder(b.model_name, pre)
    size = encoder.image_size
    g = torch.Generator().manual_seed(1)
    images = TaskImages.from_tensors(torch.randn(b.images_per_task, 3, size, size, generator=g),
                                     torch.randint(0, b.num_classes, (b.images_per_task,), generator=g))
    feats = features_of({"base": base, "expert": expert}, images, batch_size=128, device=b.device)
    del expert
    names = [f"T{t}" for t in range(b.tasks)]
    cfg = SurgeryConfig(rank=b.rank, iterations=iterations, eval_every=iterations,
                        batch_size=b.batch_size, batches_per_task=b.batches_per_task)
    stamps = []

    def on_step(it):
        sync(b.device)
        stamps.append(time.perf_counter())

    t0 = time.perf_counter()
    train_surgery_v2(names, base, {t: images for t in names}, {t: feats["expert"] for t in names},
                     {t: feats["base"] for t in names}, {t: heads[i] for i, t in enumerate(names)}, cfg,
                     device=b.device, on_step=on_step)
    steady = np.diff(stamps[:-1]) if len(stamps) > 2 else np.diff([t0] + stamps)
    params = sum(p.numel() for p in make_deep_adapters(["T0"], base, b.rank).parameters())
    return {"iteration_s": float(np.median(steady)), "iterations_timed": len(steady),
            "total_s": stamps[-1] - t0, "params_per_task": params}


def surgery_v2_reference(b: Bench, task_iterations: int = 1) -> dict:
    """One task-iteration in the originals' structure (as surgery_v1_reference: dataset and loader
    re-created, expert reloaded from disk, a merge on every forward), each batch through the deep
    forward with the task's modules and through the expert's deep forward for its targets."""
    with tempfile.TemporaryDirectory(prefix="surgery_bench_") as folder:
        encoder, pre, task_vector, _, expert_path, raw, labels, transform = surgery_inputs(b, folder)
        ref = reference_model(b, pre, task_vector)
        adapters = make_deep_adapters(["T0"], encoder, b.rank)["T0"].to(b.device)
        opt = torch.optim.Adam(adapters.parameters(), lr=1e-3)

        def task_iteration():
            dataset = ArrayDataset(raw, labels, transform)
            loader = DataLoader(dataset, batch_size=b.batch_size, shuffle=True, num_workers=0)
            state = torch.load(expert_path, map_location="cpu", weights_only=True)
            expert = build_image_encoder(b.model_name, state).to(b.device)
            for i, (x, _) in enumerate(loader):
                if i >= b.batches_per_task:
                    break
                x = x.to(b.device)
                hidden, z = ref(x, adapters)
                with torch.no_grad():
                    h_ft, z_ft = deep_forward(expert, x)
                loss = sum(F.l1_loss(h, t) for h, t in zip(hidden, h_ft)) + F.l1_loss(z, z_ft)
                opt.zero_grad()
                loss.backward()
                opt.step()

        task_iteration()   # warm-up
        t_task = statistics.median(timed(b.device, task_iteration)[0] for _ in range(task_iterations))
    return {"task_iteration_s": t_task, "iteration_s": b.tasks * t_task}
