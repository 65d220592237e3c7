"""A run's zero-shot heads: which class names and templates build them, and the cache beside the
checkpoints (`head_<Task>.pt`) keyed by what built it.

Names and templates, per checkpoint family:
- `fusionbench`: FusionBench's own lists (datasets/fusionbench_classnames.py), in either data
  format, since its experts were fine-tuned and are evaluated with them (KMNIST in hiragana, …);
  the data's classes are checked to be in FusionBench's order.
- task_vectors, tall_masks, the embedded benchmark: the task's data (`TaskData.classnames`, the
  originals' names). From parquet data, the tasks whose names come from the dataset (SUN397, Cars,
  CIFAR100, Food101, OxfordIIITPet) take its `ClassLabel` names with "_" read as a space (the rule
  these heads were built with before the reader kept the dataset's spelling).

The key (`head_<Task>.key.json`, written after the head, both atomically) names the class names,
templates, the text tower's weights (`file_digest` of the pre-trained CLIP file or folder) and the
tokenizer. A cached head whose key differs is rebuilt, and one log line says which fields differ.
A head file with no key is used as it is for task_vectors / tall_masks / the embedded benchmark
(the originals' released heads, and the embedded build's), and rebuilt for `fusionbench` (no
FusionBench download ships heads: a key-less one was built by an older taskmerge from our names).
Under torchrun rank 0 builds and writes the heads first; the other ranks then load them.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

from taskmerge.compute import distributed
from taskmerge.datasets.fusionbench_classnames import check_label_order, fusionbench_prompts
from taskmerge.datasets.templates import DATA_NAMED_COUNTS
from taskmerge.models.encoders import check_encoder_state, create_clip
from taskmerge.models.heads import ClassificationHead, build_zeroshot_head, check_head
from taskmerge.models.tokenizers import get_tokenizer, tokenizer_identity
from taskmerge.runs.identity import as_json, differing_fields
from taskmerge.runs.setup import Setup, _encoder, task_data
from taskmerge.storage import atomic
from taskmerge.storage.checkpoints import CheckpointError, file_digest, load_head, load_state_dict
from taskmerge.storage.hf_checkpoints import load_hf_clip

CLIP_FILES = ("clip_pretrained.safetensors", "clip_pretrained.pt", "open_clip_pytorch_model.bin")
KEYLESS_REUSED = ("task_vectors", "tall_masks", "safetensors", "embedded")


@dataclass(frozen=True)
class HeadPrompts:
    classnames: list[str]
    templates: list[str]
    source: str              # where the names come from (a FusionBench file, or the task's data)


def head_prompts(setup: Setup, task: str) -> HeadPrompts:
    """The class names and templates `task`'s head is built from (the module docstring)."""
    data = task_data(setup, task)
    if setup.family == "fusionbench":
        names, templates, source = fusionbench_prompts(task)
        check_label_order(task, list(data.classnames), f"the {task} data under {setup.data_location}",
                          setup.trust_label_order)
        return HeadPrompts(names, templates, f"FusionBench {source}")
    names, source = list(data.classnames), "the task data"
    if not setup.embedded and data.info.get("format") == "parquet" and task in DATA_NAMED_COUNTS:
        names, source = [n.replace("_", " ") for n in names], "the dataset's ClassLabel names, '_' → ' '"
    return HeadPrompts(names, list(data.templates), source)


def text_tower_path(setup: Setup) -> str | None:
    """The pre-trained CLIP whose text tower builds the heads: the CLIPModel folder (fusionbench),
    else the first of CLIP_FILES in the model folder; None where there is none."""
    if setup.checkpoints.family == "fusionbench":
        return setup.checkpoints.zeroshot_path
    return next((os.path.join(setup.model_dir, n) for n in CLIP_FILES
                 if os.path.exists(os.path.join(setup.model_dir, n))), None)


def head_file(setup: Setup, task: str) -> str:
    """Where `task`'s head is read: a head built into a cache folder apart from the model folder
    (it was missing or stale there, and the model folder read-only), else the checkpoints' own."""
    built = os.path.join(setup.cache_dir, f"head_{task}.pt")
    if setup.cache_dir != setup.model_dir and os.path.exists(built):
        return built
    return setup.checkpoints.head_path(task)


def head_key(setup: Setup, task: str, prompts: HeadPrompts, text_tower: str | None) -> dict:
    return as_json({"task": task, "classnames": prompts.classnames, "templates": prompts.templates,
                    "names_from": prompts.source,
                    "text_tower": file_digest(text_tower) if text_tower else None,
                    "tokenizer": tokenizer_identity(setup.arch)})


def key_path(head_path: str) -> str:
    return os.path.splitext(head_path)[0] + ".key.json"


def read_key(head_path: str) -> dict | None:
    path = key_path(head_path)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError:
        return {}  # unreadable: differs from every key, so the head is rebuilt


def load_heads(setup: Setup, log=print) -> dict[str, ClassificationHead]:
    """Each task's zero-shot head, cached or built (and cached), checked against its task's classes
    and the encoder's feature width before it is used."""
    heads = {}
    width = _encoder(setup).feature_dim
    with distributed.main_first():
        text_tower = text_tower_path(setup)
        for task in setup.tasks:
            path = head_file(setup, task)
            prompts = head_prompts(setup, task)
            heads[task] = _cached_or_built(setup, task, path, prompts, text_tower, log)
            check_head(heads[task], path, prompts.classnames, width)
    return heads


def _cached_or_built(setup: Setup, task: str, path: str, prompts: HeadPrompts, text_tower: str | None,
                     log) -> ClassificationHead:
    cached = os.path.exists(path)
    stored = read_key(path) if cached else None
    if cached and stored is None and setup.family in KEYLESS_REUSED:
        return ClassificationHead.from_state_dict(load_head(path)).to(setup.device)
    key = head_key(setup, task, prompts, text_tower)
    if cached:
        if stored is not None and text_tower is None and stored.get("text_tower"):
            stored = dict(stored, text_tower=None)  # the text tower is gone: the rest still must match
            log(f"Head {path}: its text tower is no longer in {setup.model_dir}; checked by the rest "
                f"of its key only")
        if stored == key:
            return ClassificationHead.from_state_dict(load_head(path)).to(setup.device)
        why = ("has no key (written before heads were keyed)" if stored is None else
               f"was built from another {', '.join(differing_fields(stored, key)) or 'key'}")
        log(f"Head {path} {why}: rebuilding it from {prompts.source}")
    return _build_and_cache_head(setup, task, prompts, key, text_tower)


def _pretrained_clip(setup: Setup, task: str, text_tower: str | None):
    """The pre-trained open_clip CLIP (both towers) whose text tower builds the zero-shot heads."""
    clip = create_clip(setup.arch)
    what = f"the {setup.arch} CLIP (both towers) that model_name={setup.model_name!r} builds"
    if setup.checkpoints.family == "fusionbench":  # the CLIPModel folder, as FusionBench builds them
        state, _ = load_hf_clip(text_tower)
        check_encoder_state(clip, state, text_tower, what)  # not a RuntimeError listing every key
        clip.load_state_dict({k: state[k] for k in state})
        return clip
    if text_tower is None:
        raise CheckpointError(
            f"{os.path.join(setup.model_dir, 'head_' + task + '.pt')} is missing or was built from "
            f"other inputs, and building it needs the pre-trained CLIP text tower: put the open_clip "
            f"OpenAI weights of {setup.arch} at {os.path.join(setup.model_dir, CLIP_FILES[-1])} (or "
            f"copy the heads from the task_vectors checkpoint folder)")
    state = load_state_dict(text_tower)
    check_encoder_state(clip, state, text_tower, what)
    clip.load_state_dict(state)
    return clip


def _build_and_cache_head(setup: Setup, task: str, prompts: HeadPrompts, key: dict,
                          text_tower: str | None) -> ClassificationHead:
    clip = _pretrained_clip(setup, task, text_tower).to(setup.device)
    head = build_zeroshot_head(clip, get_tokenizer(setup.arch), prompts.classnames, prompts.templates,
                               device=setup.device)
    path = os.path.join(setup.cache_dir, f"head_{task}.pt")  # where head_file finds a built head
    atomic.torch_save({"weight": head.weight.detach().cpu().clone(), "bias": head.bias.detach().cpu().clone()},
                      path)
    atomic.write_json(key_path(path), key)  # after the head: a key always describes the file beside it
    return head
