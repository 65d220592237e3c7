"""Tiny, random stand-ins for the AdaMerging / Surgery tests: the taskmerge-tiny encoder, fake
experts = pre-trained + small perturbations of the vision tower, random images and heads."""
from __future__ import annotations

import pytest
import torch

from taskmerge.adaptive.adaptation_data import TaskImages
from taskmerge.models.encoders import build_image_encoder
from taskmerge.models.heads import ClassificationHead


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """One intra-op thread: on a small shared CPU, 2 spinning OpenMP threads make these tiny ops
    up to 100× slower. Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def toy_setup(num_tasks: int = 3, n: int = 24, num_classes: int = 5, noise: float = 0.02,
              seed: int = 0, model_name: str = "taskmerge-tiny"):
    """(encoder, pretrained, task vectors, tasks, images, heads), all deterministic in `seed`."""
    torch.manual_seed(seed)
    encoder = build_image_encoder(model_name)
    pretrained = {k: v.clone() for k, v in encoder.state_dict().items()}
    tasks = [f"Task{chr(65 + i)}" for i in range(num_tasks)]
    # Fine-tuning never touches the text-side leftovers, so their task vectors are zero (§1.1).
    taus = [{k: (noise * torch.randn_like(v) if k.startswith("model.visual.") else torch.zeros_like(v))
             for k, v in pretrained.items()} for _ in tasks]
    size = encoder.image_size
    images = {t: TaskImages.from_tensors(torch.randn(n, 3, size, size),
                                         torch.randint(0, num_classes, (n,)), name=t) for t in tasks}
    heads = {}
    for t in tasks:
        w = torch.randn(num_classes, encoder.feature_dim)
        heads[t] = ClassificationHead(10.0 * w / w.norm(dim=1, keepdim=True))
    return encoder, pretrained, taus, tasks, images, heads


def apply_task_vectors(pretrained, taus, lam):
    """The plain state-dict merge θ0 + Σ_t λ_t τ_t, for λ a list of per-task scalars."""
    return {k: v + sum(l * tau[k] for l, tau in zip(lam, taus)) for k, v in pretrained.items()}


def expert_encoders(pretrained, taus, model_name: str = "taskmerge-tiny"):
    return [build_image_encoder(model_name, {k: v + tau[k] for k, v in pretrained.items()}) for tau in taus]
