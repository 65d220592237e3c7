"""Zero-shot classification heads, built exactly as task_vectors builds them (METHODS.md §1.3).

For every class: format each template, encode with the *pre-trained* text tower, L2-normalise,
average over templates, L2-normalise again; stack, multiply by exp(logit_scale). The head
L2-normalises the image feature first, so logits = exp(logit_scale) · cos(feature, class).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from taskmerge.storage.safe_pickle import CheckpointError


class ClassificationHead(nn.Linear):
    """task_vectors' ClassificationHead: a Linear whose input is L2-normalised first."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, normalize: bool = True):
        num_classes, dim = weight.shape
        super().__init__(dim, num_classes)
        self.normalize = normalize
        with torch.no_grad():
            self.weight.copy_(weight)
            self.bias.copy_(torch.zeros(num_classes) if bias is None else bias)
        self.requires_grad_(False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.normalize:
            features = features / features.norm(dim=-1, keepdim=True)
        return super().forward(features)

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "ClassificationHead":
        return cls(state["weight"].float(), state.get("bias"))


def check_head(head: ClassificationHead, source: str, classnames: Sequence[str], feature_dim: int) -> None:
    """Refuse a head that does not fit its task and encoder: one row per class name, the encoder's
    feature width, finite values. A wrong class count would be evaluated silently (argmax over the
    wrong classes), a wrong width fails deep in a matmul."""
    fix = "delete it to rebuild it from the text tower, or copy the right head file"
    rows, dim = head.weight.shape
    if rows != len(classnames):
        raise CheckpointError(f"{source}: the head has {rows} classes but the task has "
                              f"{len(classnames)} ({', '.join(classnames[:3])}, …); {fix}")
    if dim != feature_dim:
        raise CheckpointError(f"{source}: the head takes {dim}-wide features but the encoder gives "
                              f"{feature_dim}; it belongs to another model; {fix}")
    for name, t in (("weight", head.weight), ("bias", head.bias)):
        bad = int((~torch.isfinite(t)).sum())
        if bad:
            raise CheckpointError(f"{source}: the head's {name} has {bad} NaN/Inf values; {fix}")


def format_templates(templates: Sequence[str | Callable[[str], str]], classname: str) -> list[str]:
    return [t(classname) if callable(t) else t.format(c=classname) for t in templates]


@torch.no_grad()
def build_zeroshot_head(clip: nn.Module, tokenizer, classnames: Sequence[str],
                        templates: Sequence[str | Callable[[str], str]],
                        device: str | torch.device = "cpu") -> ClassificationHead:
    """The zero-shot head of a task from a full CLIP (text tower present, on `device`) and its
    templates."""
    clip.eval()
    rows = []
    for name in classnames:
        texts = tokenizer(format_templates(templates, name)).to(device)
        emb = clip.encode_text(texts)
        emb = emb / emb.norm(dim=-1, keepdim=True)
        emb = emb.mean(dim=0)
        rows.append(emb / emb.norm())
    weight = torch.stack(rows) * clip.logit_scale.exp()
    return ClassificationHead(weight)
