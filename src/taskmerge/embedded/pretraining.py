"""Contrastive (CLIP) pretraining of a small open_clip CLIP on templated, partly noisy captions.

The corpus pairs every training image with a caption drawn afresh each time the image is seen:
one of its task's prompt templates filled with its class name, or, with probability
`caption_noise`, with the name of the class's *partner*, another class of the same task fixed once
(a random cyclic derangement of the task's classes, as when web captions conflate look-alike
classes). Image features still separate every class (each class has its own mix of captions), but
near p = 0.5 a class and its partner's caption are almost equally aligned with its images: zero-shot
accuracy drops while the features stay good, which is the state real CLIP is in on the benchmark's
tasks (linear probe high, zero-shot low) and what fine-tuning through the frozen head repairs.
The loss is open_clip's own `ClipLoss` (symmetric InfoNCE) with the model's learnable
`logit_scale`, clamped to ln(100) as open_clip's trainer does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import open_clip
import torch
from torch import nn

from taskmerge.adaptive.fine_tuning import batch_indices, cosine_lr, random_resized_crop


@dataclass
class CaptionedImages:
    """A pretraining corpus over several tasks, classes numbered globally across tasks.

    images: (N, 3, H, W) normalised; labels: (N,) global class of each image;
    captions: (C, M, L) token ids, row c holding class c's captions (one per template of its task,
    padded by repetition to M); num_templates: (C,) how many of the M are real;
    partner: (C,) the class a noisy caption of class c names (c itself for a one-class task)."""
    images: torch.Tensor
    labels: torch.Tensor
    captions: torch.Tensor
    num_templates: torch.Tensor
    partner: torch.Tensor

    def sample_captions(self, labels: torch.Tensor, caption_noise: float,
                        generator: torch.Generator) -> torch.Tensor:
        """One caption per label: a random template of its class or, with probability
        `caption_noise`, of its partner class."""
        noisy = torch.rand(len(labels), generator=generator) < caption_noise
        named = torch.where(noisy, self.partner[labels], labels)
        template = (torch.rand(len(labels), generator=generator) * self.num_templates[named]).long()
        return self.captions[named, template]


def partner_classes(task_sizes: list[int], generator: torch.Generator) -> torch.Tensor:
    """For classes numbered globally over tasks of `task_sizes` classes: each class's partner, the
    next one in a random cycle through its task's classes (never itself unless the task has one)."""
    partner, offset = [], 0
    for k in task_sizes:
        order = torch.randperm(k, generator=generator)
        nxt = torch.empty(k, dtype=torch.long)
        nxt[order] = order.roll(-1)
        partner.append(offset + nxt)
        offset += k
    return torch.cat(partner)


def trimmed_text(tokens: torch.Tensor) -> torch.Tensor:
    """Drop the all-padding tail columns of a token batch (pad id 0)."""
    length = int((tokens != 0).sum(dim=1).max())
    return tokens[:, :length]


def encode_text_prefix(clip: nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    """`clip.encode_text` on a batch cut to its longest caption.

    Exact: the text transformer is causal, so a token never attends to the padding after it, and
    the pooled (EOT) token lies inside the cut."""
    tokens = trimmed_text(tokens)
    length = tokens.shape[1]
    x = clip.token_embedding(tokens) + clip.positional_embedding[:length]
    x = clip.transformer(x, attn_mask=clip.attn_mask[:length, :length])
    x = clip.ln_final(x)
    x = open_clip.transformer.text_global_pool(x, tokens, clip.text_pool_type,
                                               eos_token_id=getattr(clip, "text_eos_id", None))
    return x @ clip.text_projection


def encode_captions(clip: nn.Module, tokens: torch.Tensor, buckets: int = 4) -> torch.Tensor:
    """`clip.encode_text(tokens)`, computed once per distinct caption and in length buckets.

    A batch repeats captions (a task has only classes × templates of them) and mixes short and long
    ones; encoding the distinct ones, shortest to longest in a few cut batches, gives the same
    embeddings (and gradients, through the gather) for a fraction of the text tower's cost."""
    unique, inverse = torch.unique(tokens, dim=0, return_inverse=True)
    order = (unique != 0).sum(dim=1).argsort(stable=True)
    chunks = [encode_text_prefix(clip, unique[part]) for part in order.chunk(buckets)]
    embedded = torch.empty(len(unique), chunks[0].shape[1], dtype=chunks[0].dtype)
    embedded = embedded.index_put((order,), torch.cat(chunks))
    # Spread back with a one-hot product, not `embedded[inverse]`: the forward is the same exact
    # copy, but the gather's backward (a scatter-add on CPU threads) summed duplicate captions'
    # gradients in a varying order, and two builds of one recipe diverged (zero-shot 46.3 vs 47.1).
    one_hot = nn.functional.one_hot(inverse, len(unique)).to(embedded.dtype)
    return one_hot @ embedded


def _param_groups(clip: nn.Module, weight_decay: float) -> list[dict]:
    # open_clip's rule: no decay on gains, biases, logit_scale and embeddings-as-vectors (ndim < 2).
    decay, no_decay = [], []
    for name, p in clip.named_parameters():
        (no_decay if p.ndim < 2 or "bias" in name or "logit_scale" in name else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def pretrain_clip(clip: nn.Module, corpus: CaptionedImages, *, steps: int, batch_size: int,
                  lr: float, weight_decay: float = 0.1, warmup: int = 0, caption_noise: float = 0.0,
                  crop_scale: tuple[float, float] | None = None, grad_clip: float = 1.0,
                  seed: int = 0, progress=None) -> list[float]:
    """Train `clip` (both towers) in place with the CLIP loss; returns the loss of every step."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(_param_groups(clip, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = open_clip.loss.ClipLoss()
    batches = batch_indices(len(corpus.labels), batch_size, generator)
    losses = []
    clip.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(step, lr, warmup, steps)
        idx = next(batches)
        x = corpus.images[idx]
        if crop_scale is not None:
            x = random_resized_crop(x, generator, crop_scale)
        tokens = corpus.sample_captions(corpus.labels[idx], caption_noise, generator)
        image_features = nn.functional.normalize(clip.encode_image(x), dim=-1)
        text_features = nn.functional.normalize(encode_captions(clip, tokens), dim=-1)
        # Identical captions in a batch get identical text features, hence identical logits: the
        # image-to-text side of the loss is unaffected by such duplicates (tried: counting them
        # as positives changes nothing measurable), so open_clip's loss is used as is.
        loss = loss_fn(image_features, text_features, clip.logit_scale.exp())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), grad_clip)
        optimizer.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}", T=f"{clip.logit_scale.exp().item():.1f}",
                                 refresh=False)
    clip.eval()
    return losses
