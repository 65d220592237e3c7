"""What lives on the GPU, in bytes, for layer-wise AdaMerging, Surgery v1 and SurgeryV2 (issue 12 §3).

    python3 benchmarks/memory_plan.py                              # ViT-L/14 × 20 tasks vs 80 GiB
    python3 benchmarks/memory_plan.py --model_name=ViT-B-32 --tasks=8 --rank=16

Parameter counts come from the open_clip config, instantiated on the meta device (no weights, no
download). Activation memory is measured, not estimated: a forward at batch 1 and at batch 2 on
`device` (random weights) under `torch.autograd.graph.saved_tensors_hooks`, counting every
distinct storage autograd keeps for the backward except the weights themselves; what the backward
keeps is linear in the batch, so batch B costs fixed + B × per-image. Two graphs are measured,
the ones our code builds: AdaMerging's (the weights are requires-grad leaves, the images are not)
and SurgeryV2's (frozen weights, requires-grad modules after every block). The attention kernel
is the device's scaled_dot_product_attention (on the CPU and in fp32 on CUDA both keep the output
and its log-sum-exp, not the T × T attention matrix). Not counted: transient buffers inside one
operation or one block's backward, the CUDA context and the allocator's rounding; the GPU check
(`gpu_check.py`) measures the real peak of one step of each.
"""
from __future__ import annotations

import json
import logging
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

# the setting
model_name = "ViT-L-14"
tasks = 20
rank = 4                      # SurgeryV2's default for ViT-L/14 (16 for B/32, B/16)
surgery_v1_rank = 16          # RepresentationSurgery's default
batch_size = 16
batches_per_task = 2
num_classes = 397             # classes per head: SUN397's, the largest of the 20 tasks (a bound)
test_images = 200_000         # all tasks' test images together (assumed: 20 × 10,000)
gpu_gib = 80.0
statistics_images = 256       # Fisher / RegMean / RegMean++: training images per task (FusionBench's)
statistics_batch = 32
mtl_batch = 128               # Traditional MTL: images per task per step (FusionBench's clip_finetune)
device = "cpu"                # where the activation graphs are measured
out = ""                      # also write the plan as JSON here

FP32, FP16 = 4, 2


def meta_state_dict(name: str) -> dict:
    """The image encoder's state dict (task_vectors' keys) on the meta device: shapes only."""
    import open_clip
    import torch

    from taskmerge.models.encoders import ImageEncoder, _register_configs, open_clip_name
    _register_configs()
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.ERROR)   # "no pretrained weights": intended
    try:
        with torch.device("meta"):
            clip = open_clip.create_model(open_clip_name(name), pretrained=None, device="meta")
    finally:
        logging.getLogger().setLevel(level)
    return ImageEncoder(clip).state_dict()


def saved_bytes(run, weights) -> int:
    """Bytes of the distinct storages autograd saves while `run()` builds its graph, weights excluded."""
    import torch

    skip = {w.untyped_storage().data_ptr() for w in weights}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in skip:
            seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        keep = run()   # the graph must stay alive while it is counted
    del keep
    return sum(seen.values())


def activation_bytes(name: str, batch: int, dev: str = "cpu", seed: int = 0) -> dict:
    """{"adamerging"|"surgery_v2": (fixed, per_image)} bytes kept for the backward, from batch 1, 2."""
    import torch

    from taskmerge.adaptive.surgery_modules import deep_forward, make_deep_adapters
    from taskmerge.models.encoders import build_image_encoder

    torch.manual_seed(seed)
    encoder = build_image_encoder(name).to(dev).requires_grad_(False)
    size = encoder.image_size
    leaves = {k: v.detach().clone().requires_grad_() for k, v in encoder.state_dict().items()
              if k.startswith("model.visual.")}
    adapters = make_deep_adapters(["t"], encoder, 4)["t"].to(dev)
    weights = list(leaves.values()) + list(encoder.parameters()) + list(adapters.parameters())
    graphs = {
        "adamerging": lambda x: torch.func.functional_call(encoder, leaves, (x,)).sum(),
        "surgery_v2": lambda x: deep_forward(encoder, x, adapters)[1].sum(),
    }
    out = {}
    for kind, graph in graphs.items():
        b1, b2 = (saved_bytes(lambda n=n: graph(torch.randn(n, 3, size, size, device=dev)), weights)
                  for n in (1, 2))
        out[kind] = (2 * b1 - b2, b2 - b1)
    return out


def plan(model: str, num_tasks: int, v2_rank: int, v1_rank: int, batch: int, per_task_batches: int,
         classes: int, images: int, dev: str = "cpu") -> dict:
    """{method: [(item, bytes, note)]} of what each method keeps on the GPU (ours), and the originals'
    activation line for comparison."""
    sd = meta_state_dict(model)
    p_all = sum(v.numel() for v in sd.values())
    p_vis = sum(v.numel() for k, v in sd.items() if k.startswith("model.visual."))
    keys = len(sd)
    width = int(sd["model.visual.class_embedding"].shape[0])
    blocks = len({k.split(".")[4] for k in sd if k.startswith("model.visual.transformer.resblocks.")})
    dim = int(sd["model.visual.proj"].shape[1])
    grid = round((sd["model.visual.positional_embedding"].shape[0] - 1) ** 0.5)   # tokens = grid² + CLS
    size = grid * int(sd["model.visual.conv1.weight"].shape[-1])
    acts = activation_bytes(model, batch, dev)
    act = {k: fixed + batch * per_image for k, (fixed, per_image) in acts.items()}
    image_batch = batch * 3 * size * size * FP32
    heads = num_tasks * classes * dim * FP32
    adam = 4   # parameter, gradient, Adam's two moments
    v1_params = num_tasks * 2 * dim * v1_rank
    v2_params = num_tasks * (blocks * 2 * width * v2_rank + 2 * dim * v2_rank)
    two_t = num_tasks * per_task_batches
    ada = [
        ("θ0 (the encoder's own weights, every key)", p_all * FP32, f"{p_all:,} floats"),
        (f"task vectors, stacked (T={num_tasks}, every key)", num_tasks * p_all * FP32,
         f"{num_tasks} × {p_all:,} floats; the text leftovers are zero but stacked too"),
        ("λ (layer-wise) + its gradient + Adam's moments", adam * keys * num_tasks * FP32,
         f"{keys} rows × {num_tasks}"),
        ("merged θ(λ), vision tensors (kept for the backward through the merge)", p_vis * FP32,
         f"{p_vis:,} floats; the detached leaves share its storage"),
        ("gradient of the leaves, Σ over the step's batches", p_vis * FP32, "accumulated across batches"),
        (f"activations of one batch of {batch} (each batch's graph is freed after its backward)",
         act["adamerging"], f"measured: {acts['adamerging'][1]:,} B per image, {acts['adamerging'][0]:,} B fixed"),
        (f"one batch of images ({batch} × 3 × {size}²)", image_batch, "moved to the GPU batch by batch"),
        (f"heads (T × {classes} classes × {dim})", heads, "frozen"),
    ]
    v1 = [
        ("cached final features, merged and expert (all tasks)", 2 * images * dim * FP32,
         f"{images:,} images × {dim} × 2 floats, moved to the GPU by train_surgery"),
        (f"modules (rank {v1_rank}) + gradients + Adam's moments", adam * v1_params * FP32,
         f"{v1_params:,} parameters"),
        (f"heads (T × {classes} classes × {dim})", heads, "frozen"),
        ("feature pass, before training: one encoder at a time", p_all * FP32,
         "merged encoder, then each expert in turn (never all at once); no-grad activations are transient"),
    ]
    v2 = [
        ("the merged encoder (fixed, every key)", p_all * FP32, f"{p_all:,} floats"),
        (f"modules (rank {v2_rank}, {blocks} blocks + final) + gradients + Adam's moments",
         adam * v2_params * FP32, f"{v2_params:,} parameters ({v2_params // num_tasks:,} per task)"),
        ("expert final features z* (all tasks)", images * dim * FP32,
         f"{images:,} × {dim} floats; the per-block targets h* ({blocks} × {width} fp16 per image, "
         f"{images * blocks * width * FP16 / 2**30:.1f} GiB) stay on the host and move batch by batch"),
        (f"one batch's per-block targets ({blocks} × {batch} × {width}, fp32 on the GPU)",
         blocks * batch * width * FP32, ""),
        (f"activations of one batch of {batch} (frozen weights, trainable modules)", act["surgery_v2"],
         f"measured: {acts['surgery_v2'][1]:,} B per image, {acts['surgery_v2'][0]:,} B fixed"),
        (f"one batch of images ({batch} × 3 × {size}²)", image_batch, ""),
        (f"heads (T × {classes} classes × {dim})", heads, "frozen"),
    ]
    # the data-aware merges (issue 20): what sits on the GPU; their sums over tasks stay on the host
    maps = [int(v.shape[1]) for k, v in sd.items()   # each linear map's input width
            if k.endswith(("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight"))]
    grams = sum(d * d for d in maps) + width * width   # + the projection's input
    tokens = grid * grid + 1
    stat_act = acts["adamerging"][0] + statistics_batch * acts["adamerging"][1]
    stat_images = statistics_batch * 3 * size * size * FP32
    fisher = [
        ("the expert (every key)", p_all * FP32, "one expert at a time"),
        ("its gradient and the running Σ grad² (vision tower)", 2 * p_vis * FP32,
         "the finished Fisher moves to the host, where Σ c·F·θ and Σ c·F are accumulated "
         f"({gib(2 * p_all * FP32)} GiB of host memory, whatever T)"),
        (f"activations of one batch of {statistics_batch} (the weights need gradients)", stat_act,
         f"as AdaMerging's graph: {acts['adamerging'][1]:,} B per image"),
        (f"one batch of images ({statistics_batch} × 3 × {size}²)", stat_images, ""),
    ]
    regmean = [
        ("the expert (every key)", p_all * FP32, "one expert at a time, no gradients"),
        (f"its Grams Σ XᵀX ({len(maps)} maps + the projection)", grams * FP32,
         f"moved to the host when the expert is done; Σ G̃ and Σ G̃·Wᵀ are accumulated there "
         f"({gib(grams * FP32 + p_all * FP32)} GiB of host memory, whatever T)"),
        (f"one block's inputs of a batch of {statistics_batch} (no-grad, transient)",
         4 * statistics_batch * tokens * 4 * width * FP32, "the MLP's hidden width is 4× the model's"),
        (f"one batch of images ({statistics_batch} × 3 × {size}²)", stat_images, ""),
    ]
    regmean_pp = [
        ("the merged encoder being built + one scratch block", (p_all + p_all // max(blocks, 1)) * FP32, ""),
        ("one task's Grams of one block", (grams - width * width) // max(blocks, 1) * FP32, ""),
        (f"one batch's block inputs ({statistics_batch} × {tokens} tokens × 4·{width}, transient)",
         4 * statistics_batch * tokens * 4 * width * FP32,
         f"every task's block inputs ({num_tasks} × {statistics_images} × {tokens} × {width} floats, "
         f"{gib(num_tasks * statistics_images * tokens * width * FP32)} GiB) stay on the host"),
    ]
    mtl = [
        ("the encoder (every key)", p_all * FP32, ""),
        ("gradients + Adam's two moments (vision tower)", 3 * p_vis * FP32, ""),
        (f"activations of one task's batch of {mtl_batch} (the tasks' backwards run one after another)",
         acts["adamerging"][0] + mtl_batch * acts["adamerging"][1],
         f"{acts['adamerging'][1]:,} B per image; FusionBench keeps all {num_tasks} tasks' graphs until "
         f"one backward: {gib(num_tasks * mtl_batch * acts['adamerging'][1])} GiB"),
        (f"one task's batch of images ({mtl_batch} × 3 × {size}²)", mtl_batch * 3 * size * size * FP32, ""),
        (f"heads (T × {classes} classes × {dim})", heads, "frozen"),
    ]
    return {"model": model, "tasks": num_tasks, "params_all": p_all, "params_vision": p_vis, "keys": keys,
            "blocks": blocks, "width": width, "dim": dim, "image_size": size,
            "activations": {k: {"fixed": f, "per_image": p} for k, (f, p) in acts.items()},
            "methods": {"LW-AdaMerging": ada, "Surgery v1": v1, "SurgeryV2": v2,
                        "Fisher merging (statistics pass)": fisher, "RegMean (statistics pass)": regmean,
                        "RegMean++": regmean_pp, "Traditional MTL (one step)": mtl},
            "originals_adamerging_activations": two_t * act["adamerging"], "batches_per_step": two_t}


def total(items) -> int:
    return sum(b for _, b, _ in items)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"


def markdown(p: dict, budget_gib: float) -> str:
    lines = [f"{p['model']} × {p['tasks']} tasks: {p['params_all']:,} parameters per model "
             f"({p['params_vision']:,} in the vision tower, {p['keys']} tensors), {p['blocks']} blocks of "
             f"width {p['width']}, feature {p['dim']}, {p['image_size']} px; fp32 throughout.", ""]
    for method, items in p["methods"].items():
        lines += [f"**{method}**", "", "| on the GPU | GiB | how |", "|---|---|---|"]
        lines += [f"| {what} | {gib(n)} | {how} |" for what, n, how in items]
        t = total(items)
        lines += [f"| **total** | **{gib(t)}** | {100 * t / (budget_gib * 2**30):.0f} % of {budget_gib:g} GiB |", ""]
    ada = total(p["methods"]["LW-AdaMerging"])
    own = p["methods"]["LW-AdaMerging"][5][1]
    lines.append(f"The originals keep all {p['batches_per_step']} batches' graphs alive until one backward: "
                 f"{gib(p['originals_adamerging_activations'])} GiB of activations instead of {gib(own)}, "
                 f"a total of {gib(ada - own + p['originals_adamerging_activations'])} GiB.")
    return "\n".join(lines)


def main():
    from taskmerge.runs.config import configure
    config = configure(globals())
    p = plan(model_name, tasks, rank, surgery_v1_rank, batch_size, batches_per_task, num_classes,
             test_images, device)
    print(f"# python3 benchmarks/memory_plan.py  ({json.dumps(config)})\n")
    print(markdown(p, gpu_gib))
    if out:
        from taskmerge.storage import atomic
        atomic.write_json(out, p)


if __name__ == "__main__":
    main()
