"""Features of frozen encoders on the adaptation images, computed once.

Experts never change, so their features (final feature, and the per-block token means SurgeryV2
aligns to) are cached on disk, atomically, in a safetensors file named by a hash of the checkpoint
file's digest, the dataset's identity and content fingerprint, and the model. The per-block token
means are stored in float16 by default (`block_dtype`): they are regression targets, and
L·N·width floats would otherwise dominate memory (12 × 19,887 × 768 for SUN397 on ViT-B).
"""
from __future__ import annotations

import json
import os
from typing import Callable, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from tqdm import tqdm

from taskmerge.adaptive.adaptation_data import TaskImages
from taskmerge.adaptive.surgery_modules import deep_forward
from taskmerge.adaptive.training_state import run_hash
from taskmerge.compute import distributed
from taskmerge.models.encoders import ImageEncoder
from taskmerge.storage import atomic
from taskmerge.storage.errors import InputError


@torch.no_grad()
def features_of(encoders: Mapping[str, ImageEncoder], images: TaskImages, *, blocks: bool = True,
                block_dtype: torch.dtype = torch.float16, batch_size: int = 128,
                device: str | torch.device = "cpu", desc: str | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """For each named encoder, {"final": (N, d) float32, "blocks": (L, N, width) block_dtype} in
    dataset order, from one pass over the images (each image is read and transformed once)."""
    encoders = {k: e.to(device).eval() for k, e in encoders.items()}
    final = {k: [] for k in encoders}
    hidden = {k: [] for k in encoders}
    n, part = len(images), distributed.shard(len(images))   # under torchrun: this rank's rows
    for x, _ in tqdm(images.batches(batch_size, part), desc=desc or "features", leave=False,
                     total=-(-len(part) // batch_size)):
        x = x.to(device)
        for k, encoder in encoders.items():
            if blocks:
                h, z = deep_forward(encoder, x)
                hidden[k].append(torch.stack(h).to(block_dtype).cpu())
            else:
                z = encoder(x)
            final[k].append(z.float().cpu())
    out = {k: {"final": distributed.gather_rows(torch.cat(final[k]), n)} for k in encoders}
    if blocks:
        for k in encoders:  # (L, N, width): rows are dim 1
            out[k]["blocks"] = distributed.gather_rows(torch.cat(hidden[k], dim=1), n, dim=1)
    return out


def encoder_features(encoder: ImageEncoder, images: TaskImages, **kwargs) -> dict[str, torch.Tensor]:
    """{"final": (N, d) float32, "blocks": (L, N, width)} of one encoder (see `features_of`)."""
    return features_of({"encoder": encoder}, images, **kwargs)["encoder"]


class FeatureCache:
    """A folder of `<kind>_<hash>.safetensors` (kind "features" by default; the statistics of
    Fisher merging and RegMean use it too); `folder=None` computes without caching."""

    def __init__(self, folder: str | None, log: Callable[[str], None] = print, kind: str = "features"):
        self.folder, self.log, self.kind = folder, log, kind

    def path_for(self, key: dict) -> str | None:
        return None if self.folder is None else os.path.join(
            self.folder, f"{self.kind}_{run_hash(self.kind, key)}.safetensors")

    def load(self, key: dict) -> dict[str, torch.Tensor] | None:
        path = self.path_for(key)
        if path is None or not os.path.exists(path):
            return None
        text = json.dumps(key, sort_keys=True, default=str)
        try:
            with safe_open(path, framework="pt") as f:
                stored = (f.metadata() or {}).get("key")
            tensors = load_file(path) if stored == text else None
        except Exception as e:  # truncated or corrupt: safetensors' own errors vary by cause
            self.log(f"Cached {self.kind} {path} cannot be read ({type(e).__name__}); computing the "
                     f"{'features' if self.kind == 'features' else 'statistics'} again")
            return None
        if tensors is None:
            raise InputError(f"{path}: cached for {stored}, not {text}; delete the file")
        return tensors

    def store(self, key: dict, tensors: dict[str, torch.Tensor]) -> None:
        path = self.path_for(key)
        if path is not None:
            atomic.save_safetensors(tensors, path, metadata={"key": json.dumps(key, sort_keys=True, default=str)})

    def get_or_compute(self, key: dict, compute: Callable[[], dict[str, torch.Tensor]]
                       ) -> dict[str, torch.Tensor]:
        tensors = self.load(key)
        if tensors is None:
            tensors = compute()
            self.store(key, tensors)
        return tensors


def expert_key(images: TaskImages, *, model_name: str, checkpoint_digest: str, dataset_id: str,
               blocks: bool = True, block_dtype: torch.dtype = torch.float16) -> dict:
    return {"kind": "expert", "model": model_name, "checkpoint": checkpoint_digest,
            "dataset": dataset_id, "n": len(images), "images": images.fingerprint(),
            "blocks": blocks, "block_dtype": str(block_dtype)}


def expert_features(cache: FeatureCache, load_expert: Callable[[], ImageEncoder], images: TaskImages, *,
                    model_name: str, checkpoint_digest: str, dataset_id: str, blocks: bool = True,
                    block_dtype: torch.dtype = torch.float16, batch_size: int = 128,
                    device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The fine-tuned encoder's features on `images`, from the cache or computed once.

    `load_expert` is only called on a cache miss, so a cached run never reads the checkpoint.
    `checkpoint_digest` is a digest of the expert's checkpoint file (e.g. sha256);
    `dataset_id` names the split and its location, e.g. "SUN397/test@/data".
    """
    key = expert_key(images, model_name=model_name, checkpoint_digest=checkpoint_digest,
                     dataset_id=dataset_id, blocks=blocks, block_dtype=block_dtype)
    return cache.get_or_compute(key, lambda: encoder_features(
        load_expert(), images, blocks=blocks, block_dtype=block_dtype, batch_size=batch_size,
        device=device, desc=f"expert features {dataset_id}"))


def base_and_expert_features(base: ImageEncoder, cache: FeatureCache, load_expert: Callable[[], ImageEncoder],
                             images: TaskImages, *, model_name: str, checkpoint_digest: str, dataset_id: str,
                             blocks: bool = True, block_dtype: torch.dtype = torch.float16,
                             batch_size: int = 128, device: str | torch.device = "cpu"
                             ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base features, expert features) on `images`; on an expert cache miss both come from one
    pass over the images, so a real dataset is decoded once, not twice."""
    key = expert_key(images, model_name=model_name, checkpoint_digest=checkpoint_digest,
                     dataset_id=dataset_id, blocks=blocks, block_dtype=block_dtype)
    kw = dict(blocks=blocks, block_dtype=block_dtype, batch_size=batch_size, device=device)
    expert = cache.load(key)
    if expert is not None:
        return encoder_features(base, images, desc=f"base features {dataset_id}", **kw), expert
    both = features_of({"base": base, "expert": load_expert()}, images,
                       desc=f"base + expert features {dataset_id}", **kw)
    cache.store(key, both["expert"])
    return both["base"], both["expert"]
