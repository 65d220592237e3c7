"""Where each of FusionBench's vision weights sits in ours, for the parity benchmark's comparisons.

FusionBench merges `CLIPVisionModel` state dicts (transformers 5.x: `encoder.layers.0.self_attn.q_proj.weight`,
4.x: the same under `vision_model.`); ours are `model.<open_clip key>` with q, k, v stacked into
`in_proj_*` (storage/hf_checkpoints.py `image_encoder_recipe`). Comparisons are made in FusionBench's
keys, so a difference in q alone shows as q's. Neither side imports the other: this module needs only
taskmerge's recipe and torch.
"""
from __future__ import annotations

import math
from typing import Mapping

import torch

from taskmerge.storage.hf_checkpoints import image_encoder_recipe

_PREFIX = "vision_model."


def hf_vision_key(key: str) -> str:
    """A CLIPVisionModel key in the CLIPModel layout (`vision_model.` in front), either version."""
    return key if key.startswith(_PREFIX) else _PREFIX + key


def vision_spans(config: dict) -> dict[str, tuple[str, int, int]]:
    """{FusionBench vision key (CLIPModel layout): (our key, first flat element, end)}: q/k/v are
    the thirds of `in_proj_*` in that order; a copied key spans all of ours. The visual projection is
    not in FusionBench's vision model (its experts have none), so it is not listed."""
    spans = {}
    for ours, (op, keys) in image_encoder_recipe(config).items():
        if not all(k.startswith(_PREFIX) for k in keys):
            continue  # text-side leftovers and visual.proj: not merged by FusionBench
        if op == "copy":
            spans[keys[0]] = (ours, 0, -1)
        elif op == "cat":
            for i, k in enumerate(keys):
                spans[k] = (ours, i, len(keys))
        else:
            raise ValueError(f"{ours}: op {op!r} on a vision key; the recipe changed")
    return spans


def ours_to_hf(state: Mapping[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """Our merged encoder's vision tensors under FusionBench's keys (CLIPModel layout), split from
    `in_proj_*` where ours stacks q, k, v."""
    out = {}
    for hf, (ours, i, parts) in vision_spans(config).items():
        tensor = state[ours]
        if parts == -1:
            out[hf] = tensor
        else:
            size = tensor.shape[0] // parts
            out[hf] = tensor[i * size:(i + 1) * size]
    return out


def flat_span(config: dict, hf_key: str, shape: tuple[int, ...]) -> tuple[str, int, int]:
    """(our key, start, stop) of FusionBench's tensor `hf_key` (of `shape`) in our key's flat
    elements: what a mask drawn per our key (merging/dare.py keep_mask) covers for that tensor."""
    ours, i, parts = vision_spans(config)[hf_vision_key(hf_key)]
    n = math.prod(shape)
    return (ours, 0, n) if parts == -1 else (ours, i * n, (i + 1) * n)


def relative_l2(ours: Mapping[str, torch.Tensor], theirs: Mapping[str, torch.Tensor],
                theta0: Mapping[str, torch.Tensor]) -> dict:
    """‖θ_ours − θ_FB‖ / ‖θ_FB − θ0‖ per key (in float64) and over all keys together; `worst` is
    the largest per-key ratio and its key. A key where θ_FB = θ0 but ours moved is infinite; keys
    missing on one side are listed, never skipped silently."""
    keys = sorted(set(theirs) & set(ours))
    per_key, num, den = {}, 0.0, 0.0
    for k in keys:
        a, b, z = (t.detach().to(torch.float64).reshape(-1) for t in (ours[k], theirs[k], theta0[k]))
        d, m = float((a - b).norm()) ** 2, float((b - z).norm()) ** 2
        num, den = num + d, den + m
        per_key[k] = math.sqrt(d / m) if m > 0 else (0.0 if d == 0 else math.inf)
    worst = max(per_key, key=per_key.get) if per_key else None
    return {"overall": math.sqrt(num / den) if den > 0 else (0.0 if num == 0 else math.inf),
            "worst": per_key[worst] if worst else math.nan, "worst_key": worst, "per_key": per_key,
            "only_ours": sorted(set(ours) - set(theirs)), "only_theirs": sorted(set(theirs) - set(ours))}
