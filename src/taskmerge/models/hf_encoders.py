"""Image encoders for converted Hugging Face CLIP checkpoints (storage/hf_checkpoints.py).

A converted checkpoint comes with its open_clip model config. When that config is one of our real
backbones (ViT-B-32, ViT-B-16, ViT-L-14, with QuickGELU as OpenAI trained them) the encoder is
that model, so an HF checkpoint and a task_vectors one of the same backbone build the same module.
Any other config (a tiny random CLIP in the tests) is built from the config itself, with open_clip's
own CLIP class: architectures are data there too.

A run names its backbone (`model_name`); the checkpoint's config.json says what the model is.
FusionBench builds every model from that file (`CLIPModel.from_pretrained`,
fusion_bench/modelpool/clip_vision/modelpool.py), so `checkpoint_arch` obeys it: where the config
has the backbone's shapes but another activation or number of attention heads (every fine-tune of
a LAION CLIP says `hidden_act: "gelu"`), the run builds the config's model under a name that says
so (`ViT-B-32+gelu`); where the shapes differ, `model_name` contradicts the checkpoint and the run
is refused with the fields that differ.
"""
from __future__ import annotations

from typing import Mapping

import torch
from open_clip.model import CLIP

from taskmerge.models.encoders import (REAL_MODELS, ImageEncoder, build_image_encoder, clip_from_config,
                                       load_encoder_state, model_config, normalised_config,
                                       register_checkpoint_arch)
from taskmerge.storage.safe_pickle import CheckpointError

# What the weights' shapes fix (a contradiction with model_name) and what they do not (obeyed).
SHAPE_FIELDS = {"embed_dim": ("embed_dim",),
                "vision": ("image_size", "layers", "width", "patch_size", "mlp_ratio"),
                "text": ("context_length", "vocab_size", "width", "layers", "mlp_ratio")}
# (where, field, how the architecture's name says it)
SHAPELESS_FIELDS = (("quick_gelu", None, "{}"), ("vision_cfg", "head_width", "heads{}"),
                    ("text_cfg", "heads", "text_heads{}"))


def known_model_name(config: dict) -> str | None:
    """The real backbone whose architecture `config` describes, or None."""
    ours = normalised_config(config)
    for name in REAL_MODELS:
        theirs = model_config(name)
        if theirs is not None and normalised_config({**theirs, "quick_gelu": True}) == ours:
            return name
    return None


def create_clip_from_config(config: dict) -> CLIP:
    """A randomly initialised open_clip CLIP built from an open_clip model config dict."""
    return clip_from_config(config)


def build_hf_image_encoder(state_dict: Mapping[str, torch.Tensor], config: dict,
                           source: str = "Hugging Face checkpoint") -> tuple[ImageEncoder, str | None]:
    """(the ImageEncoder loaded from a converted state dict, its real backbone's name or None)."""
    name = known_model_name(config)
    if name is not None:
        return build_image_encoder(name, state_dict), name
    encoder = ImageEncoder(create_clip_from_config(config))
    load_encoder_state(encoder, state_dict, source)
    return encoder.eval(), None


def _shape_differences(ours: dict, theirs: dict) -> list[tuple[str, object, object]]:
    out = []
    for part, fields in SHAPE_FIELDS.items():
        for field in fields:
            a, b = ((ours[field], theirs[field]) if part == "embed_dim" else
                    (ours[f"{part}_cfg"].get(field), theirs[f"{part}_cfg"].get(field)))
            if a != b:
                out.append((field if part == "embed_dim" else f"{part} {field}", a, b))
    return out


def checkpoint_arch(model_name: str, config: dict, source: str) -> str:
    """The architecture a run on a checkpoint with open_clip config `config` (converted from
    `source`, its config.json) builds: `model_name` where the config is that backbone's; a variant
    of it, registered under `model_name+<what differs>`, where only the activation or the heads
    differ; a CheckpointError naming the fields where the shapes say it is another model."""
    reference = model_config(model_name)
    if reference is None:
        raise CheckpointError(f"model_name={model_name!r}: no such architecture; expected one of "
                              f"{', '.join(REAL_MODELS)}")
    ours, theirs = normalised_config(config), normalised_config(reference)
    differ = _shape_differences(ours, theirs)
    if differ:
        same = [n for n in REAL_MODELS if n != model_name and model_config(n) is not None
                and not _shape_differences(ours, normalised_config(model_config(n)))]
        fields = "; ".join(f"{f} {a} (model_name's {b})" for f, a, b in differ[:4])
        raise CheckpointError(
            f"{source}: describes another model than model_name={model_name!r}: {fields}"
            f"{' …' if len(differ) > 4 else ''}. "
            + (f"Set model_name={same[0]!r}, the backbone it describes, or point checkpoint_dir at "
               f"the {model_name} download" if same else
               f"No backbone taskmerge builds ({', '.join(REAL_MODELS)}) has these shapes: point "
               f"checkpoint_dir at the {model_name} download"))
    suffix = ""
    for part, field, spelled in SHAPELESS_FIELDS:
        a = ours[part] if field is None else ours[part][field]
        b = theirs[part] if field is None else theirs[part][field]
        if a != b:
            if part == "quick_gelu":
                suffix += "+" + ("quickgelu" if a else "gelu")
            elif part == "vision_cfg":
                suffix += "+" + spelled.format(ours["vision_cfg"]["width"] // a)
            else:
                suffix += "+" + spelled.format(a)
    if not suffix:
        return model_name
    name = model_name + suffix
    register_checkpoint_arch(name, ours, model_name)
    return name


__all__ = ["known_model_name", "create_clip_from_config", "build_hf_image_encoder", "checkpoint_arch",
           "SHAPE_FIELDS", "SHAPELESS_FIELDS"]
