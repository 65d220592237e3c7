"""Our RegMean / RegMean++ with their statistics in float64, for the parity benchmark's float64 rows.

  python3 benchmarks/_taskmerge_float64.py --fixture DIR --tasks MNIST,SVHN --method RegMean --out FILE

RegMean solves (Σ G̃)⁻¹ Σ G̃ Wᵀ, and Σ G̃ of an attention out_proj is ill-conditioned, so the float32
rounding of the Grams (on either side: the activations, XᵀX) moves the merged maps by ~1e-4 of the
task vectors; FusionBench's float32 torch.inverse adds ~1e-3 (both measured by the table). Comparing
the algorithms, not float32's rounding, needs both sides in float64: FusionBench's class on float64
models (benchmarks/_fusionbench_side.py), and here ours: the library's own functions
(adaptive/statistics.py gram_matrices and regmean_plusplus, merging/regmean.py) on the encoder and
the images in float64, the Grams summed in float64 (its `_GramSums` casts to float32, the script's
precision; patched here only, for this process). The images are every training image of the task,
as the parity run's sample (n = the split's size) is; the sums do not depend on their order.
Writes the merged state dict in our keys (float32, as the script saves it).
"""
from __future__ import annotations

import argparse
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.join(HERE, "..", "src"), HERE]

import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402


def float64_grams() -> None:
    """The library's Gram sums in float64 (float32 by default)."""
    from taskmerge.adaptive import statistics
    statistics._GramSums.dtype = torch.float64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--fixture", required=True)
    parser.add_argument("--tasks", required=True)
    parser.add_argument("--method", choices=["RegMean", "RegMean++"], required=True)
    parser.add_argument("--ratio", type=float, default=0.95)
    parser.add_argument("--open-clip-config", help="the tiny fixture's open_clip config")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.open_clip_config:
        from _taskmerge_side import register_as_vit_b_32
        register_as_vit_b_32(args.open_clip_config)
    from taskmerge.adaptive import statistics
    from taskmerge.adaptive.adaptation_data import TaskImages
    from taskmerge.merging.regmean import RegMeanAccumulator
    from taskmerge.runs.setup import fresh_encoder, resolve_setup, task_data
    from taskmerge.storage.hf_checkpoints import vision_model_keys
    float64_grams()
    tasks = args.tasks.split(",")
    setup = resolve_setup("ViT-B-32", os.path.join(args.fixture, "checkpoints"),
                          os.path.join(args.fixture, "data"), tasks, "parquet")
    pretrained = setup.checkpoints.pretrained()
    experts = {t: setup.checkpoints.finetuned(t) for t in tasks}
    keys = vision_model_keys(pretrained)   # the fusionbench family's key set, as the script's
    maps = statistics.linear_maps(keys)

    def images(task: str) -> TaskImages:
        data = task_data(setup, task).train
        x = torch.stack([data[i][0] for i in range(len(data))]).double()
        return TaskImages.from_tensors(x, torch.zeros(len(x), dtype=torch.long), name=task)

    if args.method == "RegMean":
        acc = RegMeanAccumulator(pretrained, maps, keys, ratio=args.ratio)
        for t in tasks:
            acc.add(experts[t], statistics.gram_matrices(fresh_encoder(setup, experts[t]).double(), images(t),
                                                         maps, batch_size=32))
        merged = acc.merged()
    else:
        merged = statistics.regmean_plusplus(fresh_encoder(setup).double(), pretrained, experts,
                                             {t: images(t) for t in tasks}, keys, ratio=args.ratio,
                                             batch_size=32, log=lambda _: None)
    save_file({k: v.float().contiguous() for k, v in merged.items()}, args.out)


if __name__ == "__main__":
    main()
