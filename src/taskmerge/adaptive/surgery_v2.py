"""SurgeryV2, deep representation surgery (METHODS.md §2.9, A.4): a module after every residual
block (on all tokens) and one on the final feature, aligned to the expert's token means h_l* (CLS
included) and final feature z*:  loss = Σ_l mean|h_l − h_l*| + mean|ẑ − z*|.

The merged weights are fixed (a plain frozen ImageEncoder, built once), but the modules change the
tokens later blocks see, so the merged encoder runs every step; the experts' targets are computed
once (`feature_cache`). Sizes come from the model: any depth and width (B/32, B/16, L/14, tiny).
Same schedule, optimizer and zero_grad_mode as v1 (`surgery.py`).
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from taskmerge.adaptive.adaptation_data import TaskImages
from taskmerge.adaptive.surgery import (SurgeryConfig, SurgeryResult, accuracy, eval_round, final_features,
                                        train_loop)
from taskmerge.adaptive.surgery_modules import deep_forward, make_deep_adapters
from taskmerge.compute import distributed
from taskmerge.models.encoders import ImageEncoder


@torch.no_grad()
def deep_surgery_pass(encoder: ImageEncoder, adapters, images: TaskImages, head: nn.Module,
                      batch_size: int = 128, device: str | torch.device = "cpu",
                      keep_features: bool = False, block_dtype: torch.dtype = torch.float16):
    """Accuracy of head(ẑ) over the full test set with SurgeryV2 modules (None: the plain encoder);
    with keep_features also the corrected {"blocks": (L, N, w), "final": (N, d)}."""
    correct, hidden, final = 0, [], []
    n, part = len(images), distributed.shard(len(images))   # under torchrun: this rank's rows
    for x, y in tqdm(images.batches(batch_size, part), desc="eval", leave=False):
        h, z = deep_forward(encoder, x.to(device), adapters)
        correct += (head(z).argmax(dim=1).cpu() == y).sum().item()
        if keep_features:
            hidden.append(torch.stack(h).to(block_dtype).cpu())
            final.append(z.float().cpu())
    correct, = distributed.sum_counts(correct)
    acc = correct / n
    if not keep_features:
        return acc
    return acc, {"blocks": distributed.gather_rows(torch.cat(hidden, dim=1), n, dim=1),
                 "final": distributed.gather_rows(torch.cat(final), n)}


def train_surgery_v2(tasks: Sequence[str], base: ImageEncoder | Mapping[str, ImageEncoder],
                     images: Mapping[str, TaskImages], targets: Mapping[str, Mapping[str, torch.Tensor]],
                     base_features: Mapping[str, torch.Tensor], heads: Mapping[str, nn.Module],
                     config: SurgeryConfig = SurgeryConfig(), *, logger=None,
                     checkpoint_dir: str | None = None, run_key: dict | None = None,
                     device: str | torch.device = "cpu",
                     on_step: Callable[[int], None] | None = None) -> SurgeryResult:
    """SurgeryV2: base = the fixed merged encoder (or one per task); targets[t] = the expert's
    {"blocks": (L, N, w), "final": (N, d)} on images[t]; base_features[t] = the base's final features
    on images[t] (tensor or feature dict; gives the step-0 accuracy exactly, since the modules start
    as the identity).
    Loss per batch: Σ_l mean|h_l − h_l*| + mean|ẑ − z*|. Logs `Ref: step 0:  dataset: …` then
    `Eval: step: <k> …`. result.corrected[t] holds the corrected features of the last evaluation."""
    bases = {t: (base[t] if isinstance(base, Mapping) else base) for t in tasks}
    for t in tasks:
        bases[t].to(device).eval().requires_grad_(False)
        heads[t].to(device).requires_grad_(False)
    gen = torch.Generator().manual_seed(config.seed)
    adapters = make_deep_adapters(tasks, bases[tasks[0]], config.rank, gen).to(device)
    block_dtype = targets[tasks[0]]["blocks"].dtype
    if logger is not None:
        logger.info(f"surgery_v2: expert per-block targets (token means incl. CLS) cached in {block_dtype}, "
                    f"final features in {targets[tasks[0]]['final'].dtype}")
    final_targets = {t: targets[t]["final"].float().to(device) for t in tasks}

    def batch_loss(t, idx):
        hidden, z = deep_forward(bases[t], images[t].take(idx).to(device), adapters[t])
        h_ft = targets[t]["blocks"][:, idx].to(device, torch.float32)
        return sum(F.l1_loss(h, h_ft[l]) for l, h in enumerate(hidden)) + \
            F.l1_loss(z, final_targets[t][idx.to(device)])

    corrected = {}

    def evaluate():
        accs = {}
        for t in tasks:
            accs[t], corrected[t] = deep_surgery_pass(bases[t], adapters[t], images[t], heads[t],
                                                      config.eval_batch_size, device, True, block_dtype)
        return accs

    init = {t: accuracy(final_features(base_features[t]), images[t].labels, heads[t]) for t in tasks}
    history, losses = train_loop("surgery_v2", tasks, {t: len(images[t]) for t in tasks}, adapters, gen,
                                 batch_loss, evaluate, eval_round(0, init, "Ref: step 0:", ""), config, logger,
                                 checkpoint_dir, run_key, on_step)
    if not corrected:   # resumed after the last iteration: one more pass for the features
        evaluate()
    return SurgeryResult(adapters, history, losses, corrected)
