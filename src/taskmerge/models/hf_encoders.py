"""Image encoders for converted Hugging Face CLIP checkpoints (storage/hf_checkpoints.py).

A converted checkpoint comes with its open_clip model config. When that config is one of our real
backbones (ViT-B-32, ViT-B-16, ViT-L-14, with QuickGELU as OpenAI trained them) the encoder is
that model, so an HF checkpoint and a task_vectors one of the same backbone build the same module.
Any other config (a tiny random CLIP in the tests) is built from the config itself, with open_clip's
own CLIP class: architectures are data there too.
"""
from __future__ import annotations

import logging
from typing import Mapping

import open_clip
import torch
from open_clip.model import CLIP

from taskmerge.models.encoders import REAL_MODELS, ImageEncoder, build_image_encoder, load_encoder_state

# open_clip's defaults for the fields its ViT configs leave out (CLIPVisionCfg, CLIPTextCfg).
_VISION_DEFAULTS = {"head_width": 64, "mlp_ratio": 4.0}
_TEXT_DEFAULTS = {"mlp_ratio": 4.0}


def _normalised(config: dict) -> dict:
    return {"embed_dim": config["embed_dim"], "quick_gelu": bool(config.get("quick_gelu", False)),
            "vision_cfg": {**_VISION_DEFAULTS, **config["vision_cfg"]},
            "text_cfg": {**_TEXT_DEFAULTS, **config["text_cfg"]}}


def known_model_name(config: dict) -> str | None:
    """The real backbone whose architecture `config` describes, or None."""
    ours = _normalised(config)
    for name in REAL_MODELS:
        theirs = open_clip.get_model_config(name)
        if theirs is not None and _normalised({**theirs, "quick_gelu": True}) == ours:
            return name
    return None


def create_clip_from_config(config: dict) -> CLIP:
    """A randomly initialised open_clip CLIP built from an open_clip model config dict."""
    config = _normalised(config)
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)  # open_clip's random-init notices, as in encoders.create_clip
    try:
        model = CLIP(embed_dim=config["embed_dim"], vision_cfg=config["vision_cfg"],
                     text_cfg=config["text_cfg"], quick_gelu=config["quick_gelu"])
    finally:
        logger.setLevel(level)
    return model.eval()


def build_hf_image_encoder(state_dict: Mapping[str, torch.Tensor], config: dict,
                           source: str = "Hugging Face checkpoint") -> tuple[ImageEncoder, str | None]:
    """(the ImageEncoder loaded from a converted state dict, its real backbone's name or None)."""
    name = known_model_name(config)
    if name is not None:
        return build_image_encoder(name, state_dict), name
    encoder = ImageEncoder(create_clip_from_config(config))
    load_encoder_state(encoder, state_dict, source)
    return encoder.eval(), None


__all__ = ["known_model_name", "create_clip_from_config", "build_hf_image_encoder"]
