"""CLIP ViT image encoders built on open_clip's own classes.

The real backbones (ViT-B-32, ViT-B-16, ViT-L-14) are always built with QuickGELU because the
OpenAI weights, and every task_vectors checkpoint, were trained with it (METHODS.md §1.1); open_clip
3.x would silently build plain GELU for the bare names. The embedded benchmark's model is one more
open_clip config (`model_configs/taskmerge-tiny.json`) with CLIP's BPE tokenizer cut down to the
words its captions use, so that its text-side leftovers stay small the way they are small next to a
real ViT's vision tower.

Nothing here downloads: models are created with random weights and then filled from a state dict.
"""
from __future__ import annotations

import logging
import os
from typing import Mapping

import open_clip
import torch
from torch import nn

from taskmerge.storage.safe_pickle import CheckpointError

TINY_MODEL = "taskmerge-tiny"
REAL_MODELS = ("ViT-B-32", "ViT-B-16", "ViT-L-14")
_CONFIG_DIR = os.path.join(os.path.dirname(__file__), "model_configs")
_registered = False
# Architectures read from a checkpoint's own config (models/hf_encoders.py `checkpoint_arch`), for a
# backbone whose config.json differs from open_clip's in what the shapes do not show (the activation,
# the number of heads): {name: (open_clip model config, the backbone it is a variant of)}.
_CHECKPOINT_ARCHS: dict[str, tuple[dict, str]] = {}
# open_clip's defaults for the fields its ViT configs leave out (CLIPVisionCfg, CLIPTextCfg).
_VISION_DEFAULTS = {"head_width": 64, "mlp_ratio": 4.0}
_TEXT_DEFAULTS = {"mlp_ratio": 4.0}


def _register_configs() -> None:
    global _registered
    if not _registered:
        open_clip.add_model_config(_CONFIG_DIR)
        _registered = True


def open_clip_name(model_name: str) -> str:
    """The open_clip config that reproduces `model_name` faithfully (QuickGELU for OpenAI ViTs)."""
    if model_name in REAL_MODELS:
        return model_name + "-quickgelu"
    return model_name


def normalised_config(config: dict) -> dict:
    """An open_clip model config with open_clip's defaults filled in, so two configs compare."""
    return {"embed_dim": config["embed_dim"], "quick_gelu": bool(config.get("quick_gelu", False)),
            "vision_cfg": {**_VISION_DEFAULTS, **config["vision_cfg"]},
            "text_cfg": {**_TEXT_DEFAULTS, **config["text_cfg"]}}


def register_checkpoint_arch(name: str, config: dict, backbone: str) -> None:
    """Make `name` an architecture built from `config`, a variant of `backbone` (whose tokenizer
    it keeps): `create_clip(name)`, `build_image_encoder(name)` then build it."""
    _CHECKPOINT_ARCHS[name] = (normalised_config(config), backbone)


def backbone_of(model_name: str) -> str:
    """The backbone an architecture read from a checkpoint is a variant of, else `model_name`."""
    return _CHECKPOINT_ARCHS[model_name][1] if model_name in _CHECKPOINT_ARCHS else model_name


def model_config(model_name: str) -> dict | None:
    """The open_clip model config `create_clip(model_name)` builds (QuickGELU for the real ViTs)."""
    if model_name in _CHECKPOINT_ARCHS:
        return dict(_CHECKPOINT_ARCHS[model_name][0])
    _register_configs()
    return open_clip.get_model_config(open_clip_name(model_name))


def clip_from_config(config: dict) -> nn.Module:
    """A randomly initialised open_clip CLIP built from an open_clip model config dict."""
    from open_clip.model import CLIP
    config = normalised_config(config)
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)  # open_clip's random-init notices, as in create_clip
    try:
        model = CLIP(embed_dim=config["embed_dim"], vision_cfg=config["vision_cfg"],
                     text_cfg=config["text_cfg"], quick_gelu=config["quick_gelu"])
    finally:
        logger.setLevel(level)
    return model.eval()


def create_clip(model_name: str) -> nn.Module:
    """A randomly initialised open_clip CLIP (image and text towers) for `model_name`."""
    if model_name in _CHECKPOINT_ARCHS:
        return clip_from_config(_CHECKPOINT_ARCHS[model_name][0])
    _register_configs()
    name = open_clip_name(model_name)
    if name not in open_clip.list_models():
        raise ValueError(
            f"unknown model {model_name!r}: expected one of {REAL_MODELS + (TINY_MODEL,)} "
            f"or a config added to {_CONFIG_DIR}")
    # open_clip logs "No pretrained weights loaded" for every random init; that is the intent here.
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        model = open_clip.create_model(name, pretrained=None)
    finally:
        logger.setLevel(level)
    model.eval()
    return model


class ImageEncoder(nn.Module):
    """task_vectors' `ImageEncoder`: open_clip CLIP with the text transformer removed.

    Its state dict therefore keeps the six text-side leftovers (token_embedding, positional_embedding,
    ln_final, text_projection, logit_scale) under the prefix `model.`, exactly as in the checkpoints.
    """

    def __init__(self, clip: nn.Module):
        super().__init__()
        if hasattr(clip, "transformer"):
            del clip.transformer
        self.model = clip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Projected CLS feature, *not* normalised: the head normalises (METHODS.md §1.1).
        return self.model.encode_image(images)

    @property
    def visual(self) -> nn.Module:
        return self.model.visual

    @property
    def image_size(self) -> int:
        size = self.model.visual.image_size
        return size[0] if isinstance(size, (tuple, list)) else int(size)

    @property
    def feature_dim(self) -> int:
        return int(self.model.visual.output_dim)


def build_image_encoder(model_name: str, state_dict: Mapping[str, torch.Tensor] | None = None
                        ) -> ImageEncoder:
    """An ImageEncoder for `model_name`, loaded from a `model.`-prefixed state dict if given."""
    encoder = ImageEncoder(create_clip(model_name))
    if state_dict is not None:
        load_encoder_state(encoder, state_dict)
    return encoder.eval()


def check_encoder_state(encoder: nn.Module, state_dict: Mapping[str, torch.Tensor],
                        source: str = "state dict", what: str = "the image encoder") -> None:
    """Refuse a state dict whose keys or shapes are not the module's (an ImageEncoder, or `what`
    else); shapes are read from a lazy reader's header when it has one, so nothing is loaded."""
    own = encoder.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: keys do not match {what} "
            f"(missing {missing[:3]}{'…' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'…' if len(unexpected) > 3 else ''}); "
            f"is it a checkpoint of a different model?")
    for k, v in own.items():
        shape = tuple(state_dict.shape(k) if hasattr(state_dict, "shape") else state_dict[k].shape)
        if shape != tuple(v.shape):
            raise CheckpointError(f"{source}: key {k!r} has shape {shape}, the model expects "
                                  f"{tuple(v.shape)}; wrong model_name, or a checkpoint of another model?")


def load_encoder_state(encoder: ImageEncoder, state_dict: Mapping[str, torch.Tensor],
                       source: str = "state dict") -> None:
    check_encoder_state(encoder, state_dict, source)
    encoder.load_state_dict({k: state_dict[k] for k in encoder.state_dict()}, strict=True)


def eval_transform(image_size: int):
    """The CLIP eval transform: bicubic resize, centre crop, RGB, CLIP mean/std (METHODS.md §1.2)."""
    return open_clip.image_transform(image_size, is_train=False)
