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

import json
import logging
import os
from typing import Mapping

import open_clip
import torch
from torch import nn

TINY_MODEL = "taskmerge-tiny"
REAL_MODELS = ("ViT-B-32", "ViT-B-16", "ViT-L-14")
_CONFIG_DIR = os.path.join(os.path.dirname(__file__), "model_configs")
_registered = False


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


def create_clip(model_name: str) -> nn.Module:
    """A randomly initialised open_clip CLIP (image and text towers) for `model_name`."""
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


def load_encoder_state(encoder: ImageEncoder, state_dict: Mapping[str, torch.Tensor],
                       source: str = "state dict") -> None:
    own = encoder.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        raise ValueError(
            f"{source}: keys do not match the image encoder "
            f"(missing {missing[:3]}{'…' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'…' if len(unexpected) > 3 else ''}); "
            f"is it a checkpoint of a different model?")
    for k, v in own.items():
        if tuple(state_dict[k].shape) != tuple(v.shape):
            raise ValueError(f"{source}: key {k!r} has shape {tuple(state_dict[k].shape)}, "
                             f"the model expects {tuple(v.shape)}; wrong model_name?")
    encoder.load_state_dict({k: state_dict[k] for k in own}, strict=True)


def eval_transform(image_size: int):
    """The CLIP eval transform: bicubic resize, centre crop, RGB, CLIP mean/std (METHODS.md §1.2)."""
    return open_clip.image_transform(image_size, is_train=False)


class PrunedBPETokenizer:
    """CLIP's BPE tokenizer restricted to the embedded benchmark's vocabulary.

    Text is split exactly as open_clip's `SimpleTokenizer` splits it (lower-cased, cleaned, BPE);
    the CLIP ids that occur in the embedded tasks' captions (`model_configs/<model>-vocab.json`,
    every task's class names × templates) are renumbered 1..V in CLIP order, so the tiny text tower
    needs a V + 4 row token embedding instead of CLIP's 49,408. Ids: 0 pad, 1..V the kept tokens,
    V + 1 unknown, V + 2 start, V + 3 end of text — the largest, so open_clip's argmax text pooling
    finds it as it does for CLIP's own ids. Sequences are cut to `context_length` as open_clip
    does: the last kept position becomes end of text.

    Whole-word tokens give each class name its own embedding rows; the byte-level tokenizer this
    replaced spelled names out, and its heads' rows came out far more alike (measured: zero-shot
    heads of mean pairwise cosine 0.68 vs 0.60 on Digits, Textures 0.47 vs 0.23)."""

    def __init__(self, bpe_ids: list[int], context_length: int):
        from open_clip.tokenizer import SimpleTokenizer
        self.bpe = SimpleTokenizer()
        self.ids = {clip_id: i + 1 for i, clip_id in enumerate(sorted(bpe_ids))}
        self.unknown, self.sot = len(self.ids) + 1, len(self.ids) + 2
        self.eot = self.vocab_size - 1
        self.context_length = context_length

    @property
    def vocab_size(self) -> int:
        return len(self.ids) + 4

    @staticmethod
    def vocabulary(texts: list[str]) -> list[int]:
        """The sorted CLIP BPE ids that `texts` use: what `<model>-vocab.json` holds."""
        from open_clip.tokenizer import SimpleTokenizer
        bpe = SimpleTokenizer()
        return sorted({i for text in texts for i in bpe.encode(text)})

    def __call__(self, texts: str | list[str]) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [self.ids.get(t, self.unknown) for t in self.bpe.encode(text)]
            ids = [self.sot] + ids[: self.context_length - 2] + [self.eot]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


def tiny_vocabulary_path(model_name: str = TINY_MODEL) -> str:
    return os.path.join(_CONFIG_DIR, f"{model_name}-vocab.json")


def get_tokenizer(model_name: str):
    """The tokenizer of `model_name`'s text tower; open_clip's BPE ships with the package."""
    if model_name == TINY_MODEL:
        _register_configs()
        text_cfg = open_clip.get_model_config(TINY_MODEL)["text_cfg"]
        with open(tiny_vocabulary_path(model_name)) as f:
            tokenizer = PrunedBPETokenizer(json.load(f)["bpe_ids"], text_cfg["context_length"])
        if tokenizer.vocab_size != text_cfg["vocab_size"]:
            raise ValueError(f"{tiny_vocabulary_path(model_name)} gives a vocabulary of "
                             f"{tokenizer.vocab_size} ids but the {model_name} config expects "
                             f"{text_cfg['vocab_size']}: regenerate one from the other")
        return tokenizer
    return open_clip.get_tokenizer(open_clip_name(model_name))
