"""The image preprocessing of each checkpoint family: open_clip's eval transform (task_vectors,
tall_masks, the embedded benchmark: `encoders.eval_transform`), and, for the `fusionbench` family,
transformers' `CLIPImageProcessor` as FusionBench applies it, reproduced pixel for pixel (its PIL
backend by default, see below).

FusionBench builds `CLIPProcessor.from_pretrained(<pretrained folder>)` (modelpool/clip_vision/
modelpool.py `load_processor`) and calls it on one `image.convert("RGB")` at a time
(dataset/image_dataset.py). With transformers 5.x that is the torchvision backend (`backend=None`
resolves to "torchvision" whenever torchvision is installed, models/auto/image_processing_auto.py
`_resolve_backend`): the RGB image as a uint8 CHW tensor; `tvF.resize` of the shortest edge to
`size` (the long edge `int(size · long / short)`, floored), bicubic with antialias, in uint8; centre
crop at `int((H − h) / 2)`, `int((W − w) / 2)` (floor: torchvision's own `center_crop` rounds half
to even, so on odd margins the two land a pixel apart); then rescale and normalize fused in float32,
`(x − mean/rescale) / (std/rescale)` (image_processing_backends.py `TorchvisionBackend`).
transformers 4.x's default (slow) processor, now `CLIPImageProcessorPil`, resizes with PIL's
bicubic instead; `backend="pil"` reproduces that one (the two resizes differ by a few grey levels).

The default is "pil": FusionBench (0.2.33) cannot run on transformers 5 (it imports
`CLIPVisionTransformer`, which 5.x removed), and transformers 4.x's `CLIPProcessor.from_pretrained`
loads the slow PIL processor for a folder saved with one, as the hub's openai/clip-vit-* folders are
(`"image_processor_type": "CLIPImageProcessor"`; checked with 4.57.6, which says so in its log).
So that is what FusionBench's experts were evaluated with, and what benchmarks/fusionbench_parity.py
compares against; `backend="torchvision"` is transformers 5.x's path.
"""
from __future__ import annotations

import json
import os

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as tvF

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSING = ("open_clip", "transformers CLIPImageProcessor")
BACKENDS = ("torchvision", "pil")
_RESAMPLE = {2: (InterpolationMode.BILINEAR, Image.BILINEAR), 3: (InterpolationMode.BICUBIC, Image.BICUBIC)}


def resize_shape(height: int, width: int, shortest_edge: int) -> tuple[int, int]:
    """(h, w) with the shortest edge at `shortest_edge` and the other floored, as transformers'
    `get_resize_output_image_size(default_to_square=False)`."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(shortest_edge * long / short)
    return (new_long, shortest_edge) if width <= height else (shortest_edge, new_long)


def crop_offsets(height: int, width: int, crop_h: int, crop_w: int) -> tuple[int, int]:
    """(top, left) of transformers' centre crop: floored, not rounded."""
    return int((height - crop_h) / 2.0), int((width - crop_w) / 2.0)


class CLIPImageProcessorTransform:
    """PIL image → normalized CHW float32 tensor, as `CLIPImageProcessor(images=[image])` gives it
    (the module docstring); picklable, so DataLoader workers can run it."""

    def __init__(self, shortest_edge: int = 224, crop_size: tuple[int, int] = (224, 224),
                 mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD, rescale_factor: float = 1 / 255,
                 resample: int = 3, backend: str = "torchvision"):
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
        if resample not in _RESAMPLE:
            raise ValueError(f"resample={resample}: only bilinear (2) and bicubic (3) are reproduced")
        self.shortest_edge, self.crop_size, self.backend = shortest_edge, tuple(crop_size), backend
        self.mean, self.std = tuple(mean), tuple(std)
        self.rescale_factor, self.resample = rescale_factor, resample

    def describe(self) -> dict:
        return {"preprocessing": PREPROCESSING[1], "backend": self.backend,
                "shortest_edge": self.shortest_edge, "crop_size": list(self.crop_size),
                "resample": self.resample, "rescale_factor": self.rescale_factor,
                "image_mean": list(self.mean), "image_std": list(self.std)}

    def __call__(self, image: Image.Image) -> torch.Tensor:
        image = image.convert("RGB")
        h, w = resize_shape(image.height, image.width, self.shortest_edge)
        if self.backend == "torchvision":
            x = torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()
            x = tvF.resize(x, [h, w], interpolation=_RESAMPLE[self.resample][0], antialias=True)
        else:  # transformers' PIL backend: PIL resize of the uint8 image, then float
            x = torch.from_numpy(np.array(image.resize((w, h), resample=_RESAMPLE[self.resample][1])))
            x = x.permute(2, 0, 1).contiguous()
        top, left = crop_offsets(h, w, *self.crop_size)
        if top < 0 or left < 0:
            raise ValueError(f"crop {self.crop_size} is larger than the resized image ({h}, {w}); "
                             f"transformers would pad it, which is not reproduced here")
        x = x[:, top: top + self.crop_size[0], left: left + self.crop_size[1]]
        if self.backend == "torchvision":  # fused: (x − mean/r) / (std/r), float32 tensors
            mean = torch.tensor(self.mean) * (1.0 / self.rescale_factor)
            std = torch.tensor(self.std) * (1.0 / self.rescale_factor)
            return tvF.normalize(x.to(torch.float32), mean.tolist(), std.tolist())
        # PIL backend: rescale in float64 then float32, normalize in numpy (image_transforms.py)
        y = x.numpy().astype(np.float64) * self.rescale_factor
        y = y.astype(np.float32)
        mean, std = np.array(self.mean, dtype=np.float32), np.array(self.std, dtype=np.float32)
        return torch.from_numpy((y - mean[:, None, None]) / std[:, None, None])


def clip_image_processor(folder: str | None, image_size: int, backend: str = "pil"
                         ) -> CLIPImageProcessorTransform:
    """The transform `CLIPProcessor.from_pretrained(folder)` applies: the folder's settings, as
    transformers looks for them (image_processing_base.py `get_image_processor_dict`): the
    `image_processor` entry of `processor_config.json` (what transformers 5.x saves), else
    `preprocessor_config.json` (openai/clip-vit-*: shortest edge and crop 224 or 336, OpenAI's
    mean and std, bicubic), else CLIPImageProcessor's defaults at the encoder's `image_size`."""
    cfg, path = {}, None
    for name, entry in (("processor_config.json", "image_processor"), ("preprocessor_config.json", None)):
        candidate = os.path.join(folder, name) if folder else ""
        if os.path.isfile(candidate):
            with open(candidate) as f:
                found = json.load(f)
            if entry is None or entry in found:
                cfg, path = (found[entry] if entry else found), candidate
                break
    if path:
        off = [k for k in ("do_resize", "do_center_crop", "do_rescale", "do_normalize") if cfg.get(k) is False]
        if off:
            raise ValueError(f"{path}: {', '.join(off)} is false; only CLIP's full preprocessing is "
                             f"reproduced (resize, centre crop, rescale, normalize)")
    size = cfg.get("size", image_size)
    shortest = size.get("shortest_edge", image_size) if isinstance(size, dict) else int(size)
    crop = cfg.get("crop_size", image_size)
    crop = (crop["height"], crop["width"]) if isinstance(crop, dict) else (int(crop), int(crop))
    return CLIPImageProcessorTransform(shortest, crop, cfg.get("image_mean", OPENAI_CLIP_MEAN),
                                       cfg.get("image_std", OPENAI_CLIP_STD),
                                       cfg.get("rescale_factor", 1 / 255), cfg.get("resample", 3), backend)
