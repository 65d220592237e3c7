"""The files the FusionBench parity benchmark runs both sides on, written here and never downloaded:
random-weight Hugging Face CLIP checkpoints in FusionBench's hub layout and small parquet test sets.

- `<root>/checkpoints/openai/clip-vit-base-patch32/`: a `CLIPModel` with the tokenizer and image
  processor files `CLIPProcessor.from_pretrained` reads (FusionBench loads its processor from there).
- `<root>/checkpoints/tanganke/clip-vit-base-patch32_<task>/`: one `CLIPVisionModel` expert per task
  (θ0's vision tower plus a small random task vector), the folders `CheckpointSet.discover` finds for
  the family "fusionbench" (storage/hf_checkpoints.py).
- `<root>/data/<repo name>/data/test-00000-of-00001.parquet` (SVHN: `svhn/cropped_digits/…`): the
  `datasets` library's own parquet (image struct + `ClassLabel` names in the schema metadata), the
  layout `hf download <repo> --repo-type dataset --local-dir` gives (datasets/parquet.py HF_SOURCES);
  beside it `train-00000-of-00001.parquet`, the training images the data-aware merges (Fisher,
  RegMean, RegMean++) take their statistics from, drawn from a generator of their own so that the
  test images are the same with or without them.

Two sizes: "tiny" (a few hundred thousand vision weights, seconds) and "b32" (ViT-B/32's shapes). The
tokenizer is CLIP's BPE as open_clip ships it, rewritten as a transformers `CLIPTokenizer`, so both
sides tokenise the class prompts with the same vocabulary. `datasets` is needed only to write the
parquet files (python3 benchmarks/fusionbench_fixtures.py runs under a python that has it).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from taskmerge.datasets.parquet import HF_SOURCES  # noqa: E402
from taskmerge.storage.hf_checkpoints import (FUSIONBENCH_MODELS, FUSIONBENCH_TASK_NAMES,  # noqa: E402
                                              open_clip_config, read_hf_checkpoint)

MODEL_NAME = "ViT-B-32"
PAPER_8 = ["SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD"]
_TEXT = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
             pad_token_id=1, hidden_act="quick_gelu")
SIZES = {
    "tiny": dict(vision_config=dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                    num_attention_heads=4, image_size=32, patch_size=8,
                                    hidden_act="quick_gelu"),
                 text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, **_TEXT),
                 projection_dim=32),
    # transformers' CLIPConfig defaults are openai/clip-vit-base-patch32's shapes
    "b32": dict(vision_config=dict(hidden_act="quick_gelu"), text_config=dict(_TEXT), projection_dim=512),
}
# the image sizes the test sets are drawn from: odd and non-square, so that a centre crop that
# rounds differently shows (issue 18 §2)
_IMAGE_SIDES = {"tiny": (29, 47), "b32": (201, 263)}


def pretrained_folder(root: str) -> str:
    return os.path.join(root, "checkpoints", *f"openai/{FUSIONBENCH_MODELS[MODEL_NAME]}".split("/"))


def expert_folder(root: str, task: str) -> str:
    return os.path.join(root, "checkpoints", "tanganke",
                        f"{FUSIONBENCH_MODELS[MODEL_NAME]}_{FUSIONBENCH_TASK_NAMES[task]}")


def dataset_file(root: str, task: str, split: str | None = None) -> str:
    """The parquet file of `task`'s `split` (default: the test split FusionBench evaluates)."""
    src = HF_SOURCES[task]
    folder = os.path.join(root, "data", src.repo.split("/")[1], src.config or "data")
    return os.path.join(folder, f"{split or src.test_split}-00000-of-00001.parquet")


def clip_config(size: str):
    from transformers import CLIPConfig
    return CLIPConfig(**json.loads(json.dumps(SIZES[size])))


def write_processor(folder: str, image_size: int) -> None:
    """CLIP's BPE (open_clip's copy, with the hub's special-token spelling) as the hub's tokenizer
    files (vocab.json, merges.txt), and the CLIPImageProcessor of the model's image size: what
    `CLIPProcessor.from_pretrained` reads, under transformers 4.x and 5.x alike."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPImageProcessor
    bpe = SimpleTokenizer()
    special = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {special.get(k, k): v for k, v in bpe.encoder.items()}
    merges = [" ".join(pair) for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokens = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
              "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(tokens, f)
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": True,
                   "errors": "replace", "processor_class": "CLIPProcessor", **tokens}, f)
    CLIPImageProcessor(size={"shortest_edge": image_size},
                       crop_size={"height": image_size, "width": image_size}).save_pretrained(folder)


def _perturb(module: torch.nn.Module, gen: torch.Generator, scale: float) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)


def write_checkpoints(root: str, size: str, tasks: list[str], seed: int = 0) -> None:
    """θ0 (a CLIPModel, every weight moved off transformers' init so none is a constant) and one
    CLIPVisionModel per task: θ0's tower plus a task vector of its own seed."""
    from transformers import CLIPModel, CLIPVisionModel
    config = clip_config(size)
    torch.manual_seed(seed)
    clip = CLIPModel(config).eval()
    _perturb(clip, torch.Generator().manual_seed(seed), 0.02)
    with torch.no_grad():
        clip.logit_scale.fill_(float(np.log(1 / 0.07)))
    folder = pretrained_folder(root)
    clip.save_pretrained(folder)
    write_processor(folder, config.vision_config.image_size)
    tower = lambda m: getattr(m, "vision_model", m)  # noqa: E731 (transformers 5.x has no wrapper)
    for t, task in enumerate(tasks):
        expert = CLIPVisionModel(config.vision_config).eval()
        tower(expert).load_state_dict(tower(clip).state_dict())
        _perturb(expert, torch.Generator().manual_seed(seed * 1000 + t + 1), 0.005)
        expert.save_pretrained(expert_folder(root, task))
    with open(os.path.join(root, "checkpoints", "fixture.json"), "w") as f:
        json.dump({"size": size, "tasks": tasks, "seed": seed}, f)


def write_open_clip_config(root: str) -> str:
    """The open_clip config of the written CLIPModel (what our side builds the model from)."""
    path = os.path.join(root, "open_clip_config.json")
    with open(path, "w") as f:
        json.dump(open_clip_config(read_hf_checkpoint(pretrained_folder(root)).config), f, indent=1)
    return path


GRAYSCALE = ("MNIST", "FashionMNIST", "KMNIST", "EMNIST", "FER2013")


def _pictures(rng: np.random.Generator, n: int, size: str, grayscale: bool) -> list:
    """n random images of random odd sizes: a coarse random colour field plus noise (images a random
    encoder tells apart)."""
    from PIL import Image as PILImage
    lo, hi = _IMAGE_SIDES[size]
    pictures = []
    for _ in range(n):
        w, h = (int(s) for s in rng.integers(lo, hi + 1, size=2))
        coarse = rng.integers(0, 256, size=(int(rng.integers(2, 6)),) * 2 + (3,), dtype=np.uint8)
        field = np.asarray(PILImage.fromarray(coarse).resize((w, h), PILImage.BILINEAR), np.int16)
        noise = rng.integers(-24, 25, size=(h, w, 3))
        picture = PILImage.fromarray(np.clip(field + noise, 0, 255).astype(np.uint8))
        pictures.append(picture.convert("L") if grayscale else picture)
    return pictures


def _write_split(path: str, pictures: list, labels: list[int], names: list[str]) -> None:
    from datasets import ClassLabel, Dataset, Features, Image
    features = Features({"image": Image(), "label": ClassLabel(names=list(names))})
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Dataset.from_dict({"image": pictures, "label": labels}, features=features).to_parquet(path)


def write_datasets(root: str, size: str, classnames: dict[str, list[str]], images_per_task: int,
                   seed: int = 0, train_images_per_task: int = 0) -> None:
    """Each task's test split: random images of random odd sizes (grayscale for the tasks whose hub
    copies are grayscale: MNIST, FashionMNIST, KMNIST, EMNIST, FER2013), random labels, the class
    names as the `ClassLabel` names. (Our reader turns FER2013 to grayscale first, as tall_masks does;
    on a grayscale image that is what FusionBench's `convert("RGB")` gives too.) With
    `train_images_per_task`, a train split of as many images beside it, from a generator of its own
    (the test images do not depend on it); its labels are random (neither side's statistics read
    them: FusionBench's Fisher and ours take the model's own softmax, RegMean none)."""
    rng = np.random.default_rng(seed)
    train_rng = np.random.default_rng([seed, 1])
    for task, names in classnames.items():
        pictures = _pictures(rng, images_per_task, size, task in GRAYSCALE)
        labels = [int(x) for x in rng.integers(0, len(names), size=images_per_task)]
        _write_split(dataset_file(root, task), pictures, labels, names)
        if train_images_per_task:
            pictures = _pictures(train_rng, train_images_per_task, size, task in GRAYSCALE)
            labels = [int(x) for x in train_rng.integers(0, len(names), size=train_images_per_task)]
            _write_split(dataset_file(root, task, "train"), pictures, labels, names)


def write_fixture(root: str, size: str, tasks: list[str], classnames: dict[str, list[str]],
                  images_per_task: int, seed: int = 0, train_images_per_task: int = 0) -> None:
    """A fresh fixture under `root` (anything there before, cached heads included, is removed)."""
    if os.path.isdir(root):
        shutil.rmtree(root)
    os.makedirs(root)
    write_checkpoints(root, size, tasks, seed)
    write_open_clip_config(root)
    write_datasets(root, size, {t: classnames[t] for t in tasks}, images_per_task, seed,
                   train_images_per_task)
    marker = os.path.join(root, "checkpoints", "fixture.json")
    with open(marker) as f:
        built = json.load(f)
    with open(marker, "w") as f:  # what --reuse-fixture compares
        json.dump({**built, "images_per_task": images_per_task,
                   "train_images_per_task": train_images_per_task}, f)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True)
    parser.add_argument("--size", choices=sorted(SIZES), default="tiny")
    parser.add_argument("--tasks", default=",".join(PAPER_8))
    parser.add_argument("--classnames", required=True, help="JSON file {task: [class names]}")
    parser.add_argument("--images-per-task", type=int, default=32)
    parser.add_argument("--train-images-per-task", type=int, default=0,
                        help="a train split of this many images per task (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with open(args.classnames) as f:
        names = json.load(f)
    write_fixture(args.root, args.size, args.tasks.split(","), names, args.images_per_task, args.seed,
                  args.train_images_per_task)
    print(f"fixture written under {args.root}")
