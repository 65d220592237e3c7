"""The fusionbench family's preprocessing against transformers' own `CLIPImageProcessor` (what
FusionBench's `CLIPProcessor.from_pretrained` instantiates), on odd-sized and non-square images:
same pixels, same crop offsets; and against its PIL backend (transformers 4.x's default)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from taskmerge.models.encoders import eval_transform
from taskmerge.models.preprocessing import (CLIPImageProcessorTransform, clip_image_processor,
                                            crop_offsets, resize_shape)

transformers = pytest.importorskip("transformers")
# (height, width): odd margins on either axis after the resize, portrait and landscape, small and large
SHAPES = [(37, 53), (53, 37), (31, 31), (300, 451), (451, 300), (225, 227), (64, 200), (17, 90)]


def _image(h: int, w: int, seed: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    # smooth gradients plus noise: a resize that differs anywhere shows
    pixels[..., 0] = (np.arange(w)[None, :] * 255 // max(w - 1, 1)).astype(np.uint8)
    return Image.fromarray(pixels).convert(mode)


def _theirs(processor, image):
    return processor(images=[image.convert("RGB")], return_tensors="pt")["pixel_values"][0]


@pytest.mark.parametrize("size", [32, 224])
def test_matches_clip_image_processor_pixel_for_pixel(size):
    from transformers import CLIPImageProcessor
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    assert processor.backend == "torchvision"  # what transformers 5.x gives FusionBench
    ours = CLIPImageProcessorTransform(size, (size, size))
    for seed, (h, w) in enumerate(SHAPES):
        for mode in ("RGB", "L"):
            image = _image(h, w, seed, mode)
            want, got = _theirs(processor, image), ours(image)
            assert got.shape == want.shape == (3, size, size)
            assert torch.equal(got, want), (h, w, mode, (got - want).abs().max())


def test_pil_backend_matches_clip_image_processor_pil():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
    processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    ours = CLIPImageProcessorTransform(32, (32, 32), backend="pil")
    for seed, (h, w) in enumerate(SHAPES):
        image = _image(h, w, seed)
        assert (ours(image) - _theirs(processor, image)).abs().max() <= 1e-6, (h, w)


def test_crop_offsets_are_floored_where_open_clip_rounds():
    # 37×55 → shortest edge 32: 32×47, a 15-pixel margin: transformers crops at 7, torchvision at
    # round(7.5) = 8 (half to even)
    assert resize_shape(37, 55, 32) == (32, 47) and resize_shape(55, 37, 32) == (47, 32)
    assert crop_offsets(32, 47, 32, 32) == (0, 7) and crop_offsets(47, 32, 32, 32) == (7, 0)
    from torchvision.transforms import CenterCrop
    columns = torch.arange(47.0).expand(1, 32, 47)
    assert CenterCrop(32)(columns)[0, 0, 0] == 8  # open_clip's crop
    from transformers import CLIPImageProcessor
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    image = _image(37, 55, 4)
    assert torch.equal(CLIPImageProcessorTransform(32, (32, 32))(image), _theirs(processor, image))
    assert not torch.allclose(eval_transform(32)(image), _theirs(processor, image), atol=1e-2)


def test_settings_come_from_the_folders_preprocessor_config(tmp_path):
    from transformers import CLIPImageProcessor
    CLIPImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 36, "width": 36},
                       image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3]).save_pretrained(tmp_path)
    assert clip_image_processor(str(tmp_path), image_size=224).backend == "pil"  # FusionBench's (4.x)
    ours = clip_image_processor(str(tmp_path), image_size=224, backend="torchvision")
    assert (ours.shortest_edge, ours.crop_size) == (40, (36, 36))
    theirs = CLIPImageProcessor.from_pretrained(tmp_path)
    image = _image(61, 47, 3)
    assert torch.equal(ours(image), _theirs(theirs, image))
    # no preprocessor_config.json (a bare save_pretrained of the model): the defaults at the encoder's size
    bare = clip_image_processor(str(tmp_path / "none"), image_size=32)
    assert (bare.shortest_edge, bare.crop_size, bare.resample) == (32, (32, 32), 3)
    cfg = json.loads((tmp_path / "preprocessor_config.json").read_text())
    # a CLIPProcessor saved by transformers 5.x: the settings nested in processor_config.json
    from test_fusionbench_heads import _hf_tokenizer_from_open_clip_vocab
    from transformers import CLIPProcessor
    saved = tmp_path / "processor"
    image_processor = CLIPImageProcessor(size={"shortest_edge": 38}, crop_size={"height": 33, "width": 33})
    CLIPProcessor(image_processor=image_processor,
                  tokenizer=_hf_tokenizer_from_open_clip_vocab()).save_pretrained(saved)
    processor = CLIPProcessor.from_pretrained(saved)  # what FusionBench's modelpool loads
    assert processor.image_processor.backend == "torchvision"
    ours = clip_image_processor(str(saved), image_size=224, backend="torchvision")
    assert (ours.shortest_edge, ours.crop_size) == (38, (33, 33))
    assert torch.equal(ours(image), _theirs(processor, image))
    # openai/clip-vit-base-patch32's own file: the older format, sizes as plain integers
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "preprocessor_config.json").write_text(json.dumps({
        "crop_size": 30, "do_center_crop": True, "do_normalize": True, "do_resize": True,
        "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 34}))
    ours = clip_image_processor(str(legacy), image_size=224, backend="torchvision")
    assert (ours.shortest_edge, ours.crop_size) == (34, (30, 30))
    assert torch.equal(ours(image), _theirs(CLIPImageProcessor.from_pretrained(legacy), image))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({**cfg, "do_center_crop": False}))
    with pytest.raises(ValueError, match="do_center_crop"):
        clip_image_processor(str(tmp_path), image_size=224)
