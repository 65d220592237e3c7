"""Hugging Face CLIP checkpoints (FusionBench's family, METHODS.md §4.3) read as open_clip encoders.

A transformers checkpoint is a folder with `config.json` and `model.safetensors` (or its sharded
`model.safetensors.index.json`, or a `pytorch_model.bin` or its shards `pytorch_model.bin.index.json`,
which only the restricted unpickler reads).
Two architectures occur: the pre-trained `CLIPModel` (`openai/clip-vit-base-patch32`: both towers,
`visual_projection`, `text_projection`, `logit_scale`) and FusionBench's experts, `CLIPVisionModel`
(`tanganke/clip-vit-base-patch32_<task>`), whose keys carry `vision_model.` under transformers 4.x
and no prefix under 5.x. Every folder is read into the CLIPModel layout, so the rest sees one form.

`convert_image_encoder` maps that layout onto task_vectors' keys `model.<open_clip key>`: q/k/v
are concatenated into `in_proj_*`, HF's Linear weights of the projections are transposed, the
activation comes from `hidden_act`. An expert has no projection nor text tower: as in FusionBench,
both come from the pre-trained CLIPModel, so their task vectors are zero. The result is a lazy
Mapping (each key reads its few source tensors), like storage/safetensors_reader.py's reader.
`convert_clip` maps a whole CLIPModel (both towers) onto open_clip's CLIP, for the zero-shot heads.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch

from taskmerge.storage import safe_pickle
from taskmerge.storage.safe_pickle import CheckpointError
from taskmerge.storage.safetensors_reader import SafetensorsReader

_README = 'see the README section "Real checkpoints"'
# transformers' CLIPVisionConfig / CLIPTextConfig / CLIPConfig defaults: transformers 4.x writes only
# the values that differ from them into config.json, so a missing key means this value.
VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                   "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
                   "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
TEXT_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048,
                 "num_hidden_layers": 12, "num_attention_heads": 8, "max_position_embeddings": 77,
                 "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
PROJECTION_DIM_DEFAULT = 512
# hidden_act -> open_clip's quick_gelu flag; HF's "gelu" is the exact (erf) GELU, as nn.GELU.
_ACTIVATIONS = {"quick_gelu": True, "gelu": False}
_ARCHITECTURES = ("CLIPModel", "CLIPVisionModel")
_VISION_SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_channels", "image_size", "patch_size", "hidden_act", "layer_norm_eps")


# --- where the folder is -------------------------------------------------------------------------

def resolve_model_folder(path: str) -> str:
    """The folder holding config.json: `path` itself, or the snapshot a hub cache entry points to.

    The hub cache keeps `models--<org>--<name>/refs/main` (a commit hash) and
    `snapshots/<hash>/` (links into `blobs/`); a `snapshots/` folder with a single revision is
    accepted without refs/main."""
    path = os.path.abspath(os.path.expanduser(str(path)))
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such folder; expected a Hugging Face model folder "
                              f"(config.json + model.safetensors) or a hub cache entry "
                              f"models--<org>--<name>; {_README}")
    snapshots = os.path.join(path, "snapshots")
    if os.path.isdir(snapshots):
        ref = os.path.join(path, "refs", "main")
        if os.path.isfile(ref):
            with open(ref) as f:
                revision = f.read().strip()
            folder = os.path.join(snapshots, revision)
            if not os.path.isfile(os.path.join(folder, "config.json")):
                raise CheckpointError(f"{ref}: points to revision {revision!r}, but {folder} has no "
                                      f"config.json; the download is incomplete, run the "
                                      f"`hf download` command again")
            return folder
        revisions = sorted(r for r in os.listdir(snapshots)
                           if os.path.isfile(os.path.join(snapshots, r, "config.json")))
        if len(revisions) == 1:
            return os.path.join(snapshots, revisions[0])
        raise CheckpointError(f"{path}: a hub cache entry without refs/main and with "
                              f"{len(revisions)} complete snapshots {revisions[:3]}; pass the "
                              f"snapshots/<revision> folder you mean")
    raise CheckpointError(f"{path}: no config.json here; expected a Hugging Face model folder "
                          f"(config.json + model.safetensors) or a hub cache entry "
                          f"models--<org>--<name> with refs/main; {_README}")


def find_model_folder(root: str, repo_id: str) -> str:
    """`repo_id` (`org/name`) under `root`: a local copy `root/org/name` (what `hf download
    --local-dir` writes) or the hub cache's `root/models--org--name` (also under `root/hub/`)."""
    cache_name = "models--" + repo_id.replace("/", "--")
    candidates = [os.path.join(root, *repo_id.split("/")), os.path.join(root, cache_name),
                  os.path.join(root, "hub", cache_name)]
    for candidate in candidates:
        if os.path.isdir(candidate):
            return resolve_model_folder(candidate)
    raise CheckpointError(f"{repo_id}: not found under {root} (looked for {', '.join(candidates)}); "
                          f"download it with `hf download {repo_id}` (hub cache) or "
                          f"`hf download {repo_id} --local-dir {candidates[0]}`; {_README}")


# --- the FusionBench family: which hub repos hold a model and task list ------------------------

# Our backbone names → the hub's (`openai/<name>`, `tanganke/<name>_<task>`).
FUSIONBENCH_MODELS = {"ViT-B-32": "clip-vit-base-patch32", "ViT-B-16": "clip-vit-base-patch16",
                      "ViT-L-14": "clip-vit-large-patch14"}
# Our task names → FusionBench's model suffixes (METHODS.md §4.3, §5.2); the same names as
# datasets/parquet.py HF_SOURCES' `fusionbench` (a test keeps the two equal: this layer cannot import
# that one). EMNIST is absent: FusionBench's `emnist_letters` is another task than tall_masks' digits.
FUSIONBENCH_TASK_NAMES = {
    "SUN397": "sun397", "Cars": "stanford-cars", "RESISC45": "resisc45", "EuroSAT": "eurosat",
    "SVHN": "svhn", "GTSRB": "gtsrb", "MNIST": "mnist", "DTD": "dtd", "STL10": "stl10",
    "OxfordIIITPet": "oxford-iiit-pet", "Flowers102": "oxford_flowers102", "CIFAR100": "cifar100",
    "PCAM": "pcam", "FER2013": "fer2013", "CIFAR10": "cifar10", "Food101": "food101",
    "FashionMNIST": "fashion_mnist", "RenderedSST2": "rendered-sst2", "KMNIST": "kmnist"}


def fusionbench_repos(model_name: str, tasks) -> tuple[str, dict[str, str]]:
    """(the pre-trained CLIPModel's repo id, {task: expert repo id}) of FusionBench's family."""
    if model_name not in FUSIONBENCH_MODELS:
        raise CheckpointError(f"model {model_name!r} has no FusionBench checkpoints; they exist for "
                              f"{', '.join(FUSIONBENCH_MODELS)}")
    unknown = [t for t in tasks if t not in FUSIONBENCH_TASK_NAMES]
    if unknown:
        raise CheckpointError(f"tasks {unknown} have no FusionBench expert of the same task (EMNIST: "
                              f"FusionBench's emnist_letters is not tall_masks' EMNIST digits)")
    hub = FUSIONBENCH_MODELS[model_name]
    return f"openai/{hub}", {t: f"tanganke/{hub}_{FUSIONBENCH_TASK_NAMES[t]}" for t in tasks}


def find_fusionbench_folders(root: str, model_name: str, tasks) -> tuple[str, dict[str, str]]:
    """(the pre-trained folder, {task: expert folder}) under the download root `root`; the error
    names every repo that is missing and the `hf download` commands that fetch them."""
    base, experts = fusionbench_repos(model_name, tuple(tasks))
    found, missing = {}, []
    for key, repo in [("pretrained", base), *experts.items()]:
        try:
            found[key] = find_model_folder(root, repo)
        except CheckpointError as e:
            missing.append((repo, str(e)))
    if missing:
        repos = [repo for repo, _ in missing]
        raise CheckpointError(f"missing {', '.join(repos[:3])}" + (f" and {len(repos) - 3} more"
                              if len(repos) > 3 else "") + f" ({missing[0][1]})")
    return found.pop("pretrained"), found


def _index_shards(index: str) -> dict[str, str]:
    """{stored key: shard file name} of a sharded checkpoint's `*.index.json` (safetensors or
    pickled shards: the same `weight_map`); a shard is a file of the folder itself."""
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
            raise TypeError("weight_map is not an object of key -> shard file")
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a shard index with a weight_map ({e}); "
                              f"download the model again") from None
    outside = sorted({v for v in weight_map.values() if os.path.basename(v) != v or v in ("", ".", "..")})
    if outside:
        raise CheckpointError(f"{index}: names shard files outside its folder ({outside[:3]}); "
                              f"a Hugging Face index names files beside it: download the model again")
    return weight_map


# The weight files of a model folder, in the order transformers' from_pretrained prefers them.
_SINGLE_SAFETENSORS, _SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"
_SINGLE_PICKLE, _PICKLE_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"


def weight_files(folder: str) -> list[str]:
    """The files a model folder's weights are read from (config.json first), as `_stored_tensors`
    reads them: model.safetensors, else its index and shards, else pytorch_model.bin, else its
    index and shards."""
    folder = resolve_model_folder(folder)
    files = None
    for single, index in ((_SINGLE_SAFETENSORS, _SAFETENSORS_INDEX), (_SINGLE_PICKLE, _PICKLE_INDEX)):
        if os.path.exists(os.path.join(folder, single)):
            files = [os.path.join(folder, single)]
        elif os.path.exists(os.path.join(folder, index)):
            shards = sorted(set(_index_shards(os.path.join(folder, index)).values()))
            files = [os.path.join(folder, index)] + [os.path.join(folder, name) for name in shards]
        if files:
            break
    return [os.path.join(folder, "config.json")] + (files or [os.path.join(folder, _SINGLE_PICKLE)])


# --- reading a folder ----------------------------------------------------------------------------

class TensorSource(Mapping[str, torch.Tensor]):
    """A lazy state dict over several stored files: {key: (reader, stored key)}."""

    def __init__(self, entries: Mapping[str, tuple[Mapping[str, torch.Tensor], str]]):
        self.entries = dict(entries)

    def __getitem__(self, key: str) -> torch.Tensor:
        reader, stored = self.entries[key]
        return reader[stored]

    def shape(self, key: str) -> tuple[int, ...]:
        reader, stored = self.entries[key]
        return tuple(reader.shape(stored) if hasattr(reader, "shape") else reader[stored].shape)

    def dtype(self, key: str) -> torch.dtype:
        reader, stored = self.entries[key]
        return reader.dtype(stored) if hasattr(reader, "dtype") else reader[stored].dtype

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, key) -> bool:
        return key in self.entries


@dataclass
class HFCheckpoint:
    """One transformers CLIP folder: its config (CLIPModel form) and tensors (CLIPModel layout)."""
    folder: str
    architecture: str  # "CLIPModel" or "CLIPVisionModel"
    config: dict  # {"vision_config": {...}, "text_config": {...} or None, "projection_dim": int}
    tensors: TensorSource


def _read_config(folder: str) -> tuple[str, dict]:
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            raw = json.load(f)
    except ValueError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e}); the download is incomplete or the "
                              f"file was edited, download the model again") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: holds a {type(raw).__name__}, expected a JSON object")
    architectures = raw.get("architectures") or []
    model_type = raw.get("model_type")
    if "CLIPModel" in architectures or (not architectures and model_type == "clip"):
        architecture = "CLIPModel"
    elif "CLIPVisionModel" in architectures or (not architectures and model_type == "clip_vision_model"):
        architecture = "CLIPVisionModel"
    else:
        raise CheckpointError(f"{path}: architectures {architectures} (model_type {model_type!r}); "
                              f"only {' and '.join(_ARCHITECTURES)} checkpoints are read, as "
                              f"FusionBench publishes them (METHODS.md §4.3)")
    for section in ("vision_config", "text_config"):
        if section in raw and raw[section] is not None and not isinstance(raw[section], dict):
            raise CheckpointError(f"{path}: {section} is a {type(raw[section]).__name__}, expected "
                                  f"a JSON object of the tower's settings (as transformers' "
                                  f"CLIPConfig writes it); the file was edited or is not a CLIP "
                                  f"config: download the model again")
    if architecture == "CLIPModel":
        config = {"vision_config": {**VISION_DEFAULTS, **(raw.get("vision_config") or {})},
                  "text_config": {**TEXT_DEFAULTS, **(raw.get("text_config") or {})},
                  "projection_dim": raw.get("projection_dim", PROJECTION_DIM_DEFAULT)}
    else:  # a vision config at the top (or nested, as a CLIPConfig); no projection of its own
        vision = raw["vision_config"] if isinstance(raw.get("vision_config"), dict) else raw
        config = {"vision_config": {**VISION_DEFAULTS, **vision}, "text_config": None,
                  "projection_dim": None}
    act = config["vision_config"]["hidden_act"]
    if act not in _ACTIVATIONS:
        raise CheckpointError(f"{path}: vision hidden_act {act!r}; open_clip builds only "
                              f"{sorted(_ACTIVATIONS)}, so this model cannot be converted faithfully")
    if config["vision_config"]["layer_norm_eps"] != 1e-5:
        raise CheckpointError(f"{path}: vision layer_norm_eps {config['vision_config']['layer_norm_eps']}"
                              f"; open_clip's CLIP uses 1e-5, so this model cannot be converted "
                              f"faithfully")
    return architecture, config


def _stored_tensors(folder: str) -> dict[str, tuple[Mapping[str, torch.Tensor], str]]:
    """{stored key: (reader, key)} from model.safetensors, its shards, pytorch_model.bin or its
    shards (`pytorch_model.bin.index.json`, as transformers writes a large model by default before
    safetensors): pickled files only through the restricted unpickler."""
    single, index = os.path.join(folder, _SINGLE_SAFETENSORS), os.path.join(folder, _SAFETENSORS_INDEX)
    pickled, pickled_index = os.path.join(folder, _SINGLE_PICKLE), os.path.join(folder, _PICKLE_INDEX)
    if os.path.exists(single):
        reader = SafetensorsReader(single)
        return {k: (reader, k) for k in reader}
    if os.path.exists(index):
        weight_map = _index_shards(index)
        readers = {name: SafetensorsReader(os.path.join(folder, name))
                   for name in sorted(set(weight_map.values()))}
        return _indexed(index, weight_map, readers)
    if os.path.exists(pickled):
        tensors = safe_pickle.safe_load(pickled)
        return {k: (tensors, k) for k in tensors}
    if os.path.exists(pickled_index):
        weight_map = _index_shards(pickled_index)
        shards = {name: safe_pickle.safe_load(os.path.join(folder, name))
                  for name in sorted(set(weight_map.values()))}
        return _indexed(pickled_index, weight_map, shards)
    raise CheckpointError(f"{folder}: has config.json but no {_SINGLE_SAFETENSORS}, "
                          f"{_SAFETENSORS_INDEX}, {_SINGLE_PICKLE} or {_PICKLE_INDEX}; the download "
                          f"is incomplete, run the `hf download` command again")


def _indexed(index: str, weight_map: dict[str, str], shards: Mapping[str, Mapping[str, torch.Tensor]]
             ) -> dict[str, tuple[Mapping[str, torch.Tensor], str]]:
    """{key: (its shard, key)}, each key checked to be in the shard the index names."""
    absent = [(k, name) for k, name in weight_map.items() if k not in shards[name]]
    if absent:
        key, name = absent[0]
        raise CheckpointError(f"{index}: names {len(absent)} tensors its shards do not hold (e.g. "
                              f"{key!r} in {name}); the index and the shards are of different "
                              f"downloads: download the model again")
    return {k: (shards[name], k) for k, name in weight_map.items()}


def read_hf_checkpoint(path: str) -> HFCheckpoint:
    """A CLIPModel or CLIPVisionModel folder (or hub cache entry), keys in the CLIPModel layout."""
    folder = resolve_model_folder(path)
    architecture, config = _read_config(folder)
    stored = _stored_tensors(folder)
    # position_ids was a persistent buffer in early transformers 4.x; it is arange, not a weight.
    stored = {k: v for k, v in stored.items() if not k.endswith("embeddings.position_ids")}
    if architecture == "CLIPVisionModel" and not any(k.startswith("vision_model.") for k in stored):
        stored = {"vision_model." + k: v for k, v in stored.items()}  # transformers 5.x layout
    needed = "vision_model.embeddings.patch_embedding.weight"
    if needed not in stored:
        raise CheckpointError(f"{folder}: the weights have no {needed!r} (first keys "
                              f"{sorted(stored)[:3]}); not a CLIP vision tower of transformers "
                              f"4.x or 5.x")
    return HFCheckpoint(folder, architecture, config, TensorSource(stored))


# --- conversion ----------------------------------------------------------------------------------

def open_clip_config(config: dict) -> dict:
    """The open_clip model config (the JSON form of open_clip's model_configs) of a CLIPModel."""
    vision, text = config["vision_config"], config["text_config"]
    return {
        "embed_dim": config["projection_dim"],
        "quick_gelu": _ACTIVATIONS[vision["hidden_act"]],
        "vision_cfg": {"image_size": vision["image_size"], "layers": vision["num_hidden_layers"],
                       "width": vision["hidden_size"], "patch_size": vision["patch_size"],
                       "head_width": vision["hidden_size"] // vision["num_attention_heads"],
                       "mlp_ratio": vision["intermediate_size"] / vision["hidden_size"]},
        "text_cfg": {"context_length": text["max_position_embeddings"],
                     "vocab_size": text["vocab_size"], "width": text["hidden_size"],
                     "heads": text["num_attention_heads"], "layers": text["num_hidden_layers"],
                     "mlp_ratio": text["intermediate_size"] / text["hidden_size"]},
    }


def clip_model_config(checkpoint: HFCheckpoint) -> dict:
    """The open_clip config of a pre-trained CLIPModel folder, refused where open_clip cannot build
    its text tower as the config says (open_clip's CLIP has one activation for both towers)."""
    text, vision = checkpoint.config["text_config"], checkpoint.config["vision_config"]
    path = os.path.join(checkpoint.folder, "config.json")
    if text is None:
        raise CheckpointError(f"{checkpoint.folder}: a {checkpoint.architecture} has no text tower; "
                              f"the pre-trained model must be a full CLIPModel")
    differ = [f"{k}: text {text[k]!r}, vision {v!r}" for k, v in
              (("hidden_act", vision["hidden_act"]), ("layer_norm_eps", 1e-5)) if text[k] != v]
    if differ:
        raise CheckpointError(f"{path}: the text tower's {'; '.join(differ)}; open_clip builds both "
                              f"towers with one activation and layer_norm_eps 1e-5, so this model's "
                              f"zero-shot heads cannot be built faithfully")
    return open_clip_config(checkpoint.config)


def _block_recipe(ours: str, hf: str) -> dict[str, tuple[str, list[str]]]:
    attn = f"{hf}.self_attn"
    return {
        f"{ours}.ln_1.weight": ("copy", [f"{hf}.layer_norm1.weight"]),
        f"{ours}.ln_1.bias": ("copy", [f"{hf}.layer_norm1.bias"]),
        f"{ours}.attn.in_proj_weight": ("cat", [f"{attn}.{p}_proj.weight" for p in "qkv"]),
        f"{ours}.attn.in_proj_bias": ("cat", [f"{attn}.{p}_proj.bias" for p in "qkv"]),
        f"{ours}.attn.out_proj.weight": ("copy", [f"{attn}.out_proj.weight"]),
        f"{ours}.attn.out_proj.bias": ("copy", [f"{attn}.out_proj.bias"]),
        f"{ours}.ln_2.weight": ("copy", [f"{hf}.layer_norm2.weight"]),
        f"{ours}.ln_2.bias": ("copy", [f"{hf}.layer_norm2.bias"]),
        f"{ours}.mlp.c_fc.weight": ("copy", [f"{hf}.mlp.fc1.weight"]),
        f"{ours}.mlp.c_fc.bias": ("copy", [f"{hf}.mlp.fc1.bias"]),
        f"{ours}.mlp.c_proj.weight": ("copy", [f"{hf}.mlp.fc2.weight"]),
        f"{ours}.mlp.c_proj.bias": ("copy", [f"{hf}.mlp.fc2.bias"]),
    }


def image_encoder_recipe(config: dict) -> dict[str, tuple[str, list[str]]]:
    """{`model.<open_clip key>`: (op, CLIPModel keys)} in open_clip's state-dict order; op is
    copy, cat (q/k/v stacked on dim 0) or t (a Linear weight transposed into a matmul matrix)."""
    v, t = "vision_model", "text_model"
    recipe = {
        "model.positional_embedding": ("copy", [f"{t}.embeddings.position_embedding.weight"]),
        "model.text_projection": ("t", ["text_projection.weight"]),
        "model.logit_scale": ("copy", ["logit_scale"]),
        "model.visual.class_embedding": ("copy", [f"{v}.embeddings.class_embedding"]),
        "model.visual.positional_embedding": ("copy", [f"{v}.embeddings.position_embedding.weight"]),
        "model.visual.proj": ("t", ["visual_projection.weight"]),
        "model.visual.conv1.weight": ("copy", [f"{v}.embeddings.patch_embedding.weight"]),
        "model.visual.ln_pre.weight": ("copy", [f"{v}.pre_layrnorm.weight"]),
        "model.visual.ln_pre.bias": ("copy", [f"{v}.pre_layrnorm.bias"]),
    }
    for i in range(config["vision_config"]["num_hidden_layers"]):
        recipe.update(_block_recipe(f"model.visual.transformer.resblocks.{i}",
                                    f"{v}.encoder.layers.{i}"))
    recipe.update({
        "model.visual.ln_post.weight": ("copy", [f"{v}.post_layernorm.weight"]),
        "model.visual.ln_post.bias": ("copy", [f"{v}.post_layernorm.bias"]),
        "model.token_embedding.weight": ("copy", [f"{t}.embeddings.token_embedding.weight"]),
        "model.ln_final.weight": ("copy", [f"{t}.final_layer_norm.weight"]),
        "model.ln_final.bias": ("copy", [f"{t}.final_layer_norm.bias"]),
    })
    return recipe


class ConvertedStateDict(Mapping[str, torch.Tensor]):
    """A lazy converted state dict: each key is built from its CLIPModel tensors on read; `path`
    (the model folder) is what error messages name."""

    def __init__(self, source: Mapping[str, torch.Tensor], recipe: dict[str, tuple[str, list[str]]],
                 path: str = "Hugging Face checkpoint"):
        missing = sorted({k for _, keys in recipe.values() for k in keys if k not in source})
        if missing:
            raise CheckpointError(f"{path}: lacks {len(missing)} tensors a CLIP image encoder needs "
                                  f"({missing[:3]}{'…' if len(missing) > 3 else ''}); is it a "
                                  f"truncated download or another model?")
        self.source, self.recipe, self.path = source, recipe, path

    def __getitem__(self, key: str) -> torch.Tensor:
        op, keys = self.recipe[key]
        if op == "cat":
            return torch.cat([self.source[k] for k in keys], dim=0)
        tensor = self.source[keys[0]]
        return tensor.t().contiguous() if op == "t" else tensor

    def shape(self, key: str) -> tuple[int, ...]:
        op, keys = self.recipe[key]
        shapes = [tuple(self.source.shape(k)) if hasattr(self.source, "shape")
                  else tuple(self.source[k].shape) for k in keys]
        if op == "cat":
            return (sum(s[0] for s in shapes),) + shapes[0][1:]
        return shapes[0][::-1] if op == "t" else shapes[0]

    def dtype(self, key: str) -> torch.dtype:
        op, keys = self.recipe[key]
        dtypes = {self.source.dtype(k) if hasattr(self.source, "dtype") else self.source[k].dtype
                  for k in keys}
        if len(dtypes) > 1:  # torch.cat would silently promote
            raise CheckpointError(f"{self.path}: {keys} are stored in different dtypes "
                                  f"{sorted(map(str, dtypes))}; the file is corrupt")
        return dtypes.pop()

    def __iter__(self) -> Iterator[str]:
        return iter(self.recipe)

    def __len__(self) -> int:
        return len(self.recipe)

    def __contains__(self, key) -> bool:
        return key in self.recipe

    def __repr__(self) -> str:
        return f"ConvertedStateDict({self.path!r}, {len(self)} tensors)"


def convert_image_encoder(tensors: Mapping[str, torch.Tensor], config: dict,
                          name: str = "Hugging Face checkpoint") -> ConvertedStateDict:
    """CLIPModel-layout tensors + config -> our image encoder's `model.<open_clip key>` state dict."""
    return ConvertedStateDict(tensors, image_encoder_recipe(config), name)


def clip_recipe(config: dict) -> dict[str, tuple[str, list[str]]]:
    """{open_clip CLIP key: (op, CLIPModel keys)} for both towers (the zero-shot heads' CLIP), in
    open_clip's order: the image encoder's keys unprefixed, the text blocks before token_embedding."""
    recipe = {}
    for key, how in image_encoder_recipe(config).items():
        if key == "model.token_embedding.weight":
            for i in range(config["text_config"]["num_hidden_layers"]):
                recipe.update(_block_recipe(f"transformer.resblocks.{i}",
                                            f"text_model.encoder.layers.{i}"))
        recipe[key[len("model."):]] = how
    return recipe


def convert_clip(tensors: Mapping[str, torch.Tensor], config: dict,
                 name: str = "Hugging Face checkpoint") -> ConvertedStateDict:
    """A CLIPModel's tensors + config -> the state dict of open_clip's CLIP (both towers)."""
    text, vision = config["text_config"], config["vision_config"]
    if text is None:
        raise CheckpointError(f"{name}: a CLIPVisionModel has no text tower; the zero-shot heads "
                              f"come from the pre-trained CLIPModel")
    if text["hidden_act"] != vision["hidden_act"] or text["layer_norm_eps"] != 1e-5:
        raise CheckpointError(f"{name}: text tower with hidden_act {text['hidden_act']!r}, "
                              f"layer_norm_eps {text['layer_norm_eps']}; open_clip builds both "
                              f"towers with the vision tower's {vision['hidden_act']!r} and 1e-5, "
                              f"so this model cannot be converted faithfully")
    return ConvertedStateDict(tensors, clip_recipe(config), name)


def with_pretrained_parts(expert: HFCheckpoint, pretrained: HFCheckpoint) -> HFCheckpoint:
    """An expert CLIPVisionModel completed by the pre-trained CLIPModel's projection and text tower
    (FusionBench's construction); refuses an expert of another backbone."""
    if pretrained.architecture != "CLIPModel":
        raise CheckpointError(f"{pretrained.folder}: the pre-trained model must be a full CLIPModel "
                              f"(e.g. openai/clip-vit-base-patch32), found {pretrained.architecture}")
    if expert.architecture == "CLIPModel":
        return expert
    ours, theirs = expert.config["vision_config"], pretrained.config["vision_config"]
    differ = [k for k in _VISION_SHAPE_KEYS if ours[k] != theirs[k]]
    if differ:
        raise CheckpointError(f"{expert.folder}: vision config differs from the pre-trained model "
                              f"{pretrained.folder} in {differ} ({[ours[k] for k in differ]} vs "
                              f"{[theirs[k] for k in differ]}); pair each expert with its own "
                              f"backbone's CLIPModel")
    entries = {k: v for k, v in pretrained.tensors.entries.items()
               if not k.startswith("vision_model.")}
    entries.update(expert.tensors.entries)
    config = {**pretrained.config, "vision_config": ours}
    return HFCheckpoint(expert.folder, "CLIPModel", config, TensorSource(entries))


def load_hf_image_encoder(path: str, pretrained: str | HFCheckpoint | None = None
                          ) -> tuple[ConvertedStateDict, dict]:
    """(our image-encoder state dict, its open_clip config) of a CLIPModel folder, or of a
    CLIPVisionModel folder together with the pre-trained CLIPModel at `pretrained`."""
    checkpoint = read_hf_checkpoint(path)
    if checkpoint.architecture != "CLIPModel":
        if pretrained is None:
            raise CheckpointError(f"{checkpoint.folder}: a CLIPVisionModel has no projection; pass "
                                  f"the pre-trained CLIPModel folder it was fine-tuned from "
                                  f"(e.g. openai/clip-vit-base-patch32) as `pretrained`")
        if not isinstance(pretrained, HFCheckpoint):
            pretrained = read_hf_checkpoint(pretrained)
        checkpoint = with_pretrained_parts(checkpoint, pretrained)
    state = convert_image_encoder(checkpoint.tensors, checkpoint.config, checkpoint.folder)
    return state, open_clip_config(checkpoint.config)


def load_hf_clip(path: str) -> tuple[ConvertedStateDict, dict]:
    """(open_clip CLIP state dict, its open_clip config) of a pre-trained CLIPModel folder."""
    checkpoint = read_hf_checkpoint(path)
    if checkpoint.architecture != "CLIPModel":
        raise CheckpointError(f"{checkpoint.folder}: a {checkpoint.architecture} has no text tower; "
                              f"the zero-shot heads come from the pre-trained CLIPModel folder "
                              f"(e.g. openai/clip-vit-base-patch32)")
    state = convert_clip(checkpoint.tensors, checkpoint.config, checkpoint.folder)
    return state, open_clip_config(checkpoint.config)


def vision_model_keys(state_dict: Mapping[str, torch.Tensor]) -> list[str] | None:
    """The converted keys built from `vision_model.*` tensors only, in order: exactly the entries of
    a CLIPVisionModel's state dict, which is what FusionBench flattens and merges (its
    `position_ids` is a non-persistent buffer, not in the state dict; the projection and the text
    tower are not there at all). None for a state dict that is not a converted HF checkpoint."""
    if not isinstance(state_dict, ConvertedStateDict):
        return None
    return [key for key, (_, sources) in state_dict.recipe.items()
            if all(source.startswith("vision_model.") for source in sources)]


__all__ = ["FUSIONBENCH_MODELS", "FUSIONBENCH_TASK_NAMES", "fusionbench_repos",
           "find_fusionbench_folders", "weight_files", "HFCheckpoint", "TensorSource", "ConvertedStateDict",
           "resolve_model_folder", "find_model_folder", "read_hf_checkpoint", "open_clip_config", "clip_model_config", "image_encoder_recipe",
           "convert_image_encoder", "clip_recipe", "convert_clip", "with_pretrained_parts",
           "load_hf_image_encoder", "load_hf_clip", "vision_model_keys"]
