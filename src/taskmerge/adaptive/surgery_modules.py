"""Representation Surgery modules (METHODS.md §2.8, §2.9) and the ViT forward that hosts them.

A module predicts the merged model's representation bias and subtracts it:
    ẑ = z − up(ReLU(down(z))),  down: dim→r (Kaiming-uniform, a=√5), up: r→dim (zeros), no biases,
so it is the identity at init. v1 puts one on the final image feature; v2 (deep surgery) adds one
after every residual block, on all tokens, and aligns the token means h_l (CLS included).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from taskmerge.models.encoders import ImageEncoder


class SurgeryAdapter(nn.Module):
    def __init__(self, dim: int, rank: int, generator: torch.Generator | None = None):
        super().__init__()
        # skip_init: the default init would draw from the global RNG; ours draws from `generator`.
        self.down = nn.utils.skip_init(nn.Linear, dim, rank, bias=False)
        self.up = nn.utils.skip_init(nn.Linear, rank, dim, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.up.weight)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z - self.up(F.relu(self.down(z)))


class DeepSurgeryAdapters(nn.Module):
    """SurgeryV2's modules of one task: one per residual block (width w) and a final one (dim d).
    Parameters: L·2·w·r + 2·d·r."""

    def __init__(self, width: int, num_blocks: int, out_dim: int, rank: int,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.blocks = nn.ModuleList(SurgeryAdapter(width, rank, generator) for _ in range(num_blocks))
        self.final = SurgeryAdapter(out_dim, rank, generator)


def encoder_sizes(encoder: ImageEncoder) -> tuple[int, int, int]:
    """(width, number of residual blocks, output dim), read from the model (B/32, B/16, L/14, tiny)."""
    visual = encoder.model.visual
    blocks = visual.transformer.resblocks
    return int(visual.transformer.width), len(blocks), int(encoder.feature_dim)


def _check_task_names(tasks: Sequence[str]) -> None:
    bad = [t for t in tasks if "." in t or not t]
    if bad:
        raise ValueError(f"task names {bad} cannot key a ModuleDict (no dots, not empty)")


def make_adapters(tasks: Sequence[str], dim: int, rank: int, seed: int | torch.Generator = 0
                  ) -> nn.ModuleDict:
    """Surgery v1: one SurgeryAdapter per task, initialised in task order from a seeded generator."""
    _check_task_names(tasks)
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    return nn.ModuleDict({t: SurgeryAdapter(dim, rank, gen) for t in tasks})


def make_deep_adapters(tasks: Sequence[str], encoder: ImageEncoder, rank: int,
                       seed: int | torch.Generator = 0) -> nn.ModuleDict:
    """SurgeryV2: DeepSurgeryAdapters per task, sized from `encoder`."""
    _check_task_names(tasks)
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    width, num_blocks, out_dim = encoder_sizes(encoder)
    return nn.ModuleDict({t: DeepSurgeryAdapters(width, num_blocks, out_dim, rank, gen) for t in tasks})


def deep_forward(encoder: ImageEncoder, images: torch.Tensor,
                 adapters: DeepSurgeryAdapters | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The image encoder's forward, step by step, recording the token mean h_l after every block.

    Replicates open_clip 3.x `VisionTransformer.forward` (embeds → resblocks → pool → proj). The
    tokens stay batch-first (N, L, D) throughout: SurgeryV2's hand-written forward permuted to
    (L, N, D) for open_clip 2.0.2; doing that on 3.x's batch-first blocks mixes samples (§1.1).
    With `adapters`, each block's output is corrected before it feeds the next block, and the
    returned feature is the corrected ẑ. Returns ([h_1 … h_L], z), h_l of shape (N, width).
    """
    visual = encoder.model.visual
    if getattr(visual, "attn_pool", None) is not None:
        raise NotImplementedError("attentional pooling (CoCa-style) vision towers are not supported")
    x = visual.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)       # (N, grid², width)
    cls = visual.class_embedding.view(1, 1, -1).expand(x.shape[0], -1, -1).to(x.dtype)
    x = torch.cat([cls, x], dim=1)
    x = x + visual.positional_embedding.to(x.dtype)
    x = visual.patch_dropout(x)
    x = visual.ln_pre(x)
    batch_first = getattr(visual.transformer, "batch_first", True)
    hidden = []
    for l, block in enumerate(visual.transformer.resblocks):
        x = block(x) if batch_first else block(x.transpose(0, 1)).transpose(0, 1)
        if adapters is not None:
            x = adapters.blocks[l](x)
        hidden.append(x.mean(dim=1))
    if visual.final_ln_after_pool:
        pooled = visual.ln_post(visual._global_pool(x)[0])
    else:
        pooled = visual._global_pool(visual.ln_post(x))[0]
    if visual.proj is not None:
        pooled = pooled @ visual.proj
    if adapters is not None:
        pooled = adapters.final(pooled)
    return hidden, pooled
