"""Finding and reading expert checkpoints: task_vectors, tall_masks and converted safetensors.

Three layouts under `<root>/<model>/` (METHODS.md §4.1, §4.2):

    task_vectors  zeroshot.pt, <Task>/finetuned.pt, head_<Task>.pt
    tall_masks    MNISTVal/nonlinear_zeroshot.pt, <Task>Val/nonlinear_finetuned.pt, head_<Task>Val.pt
    safetensors   safetensors/zeroshot.safetensors, safetensors/<Task>.safetensors,
                  safetensors/head_<Task>.safetensors

A fourth, FusionBench's Hugging Face folders (METHODS.md §4.3), sits under the download root itself:
`<root>/openai/clip-vit-base-patch32`, `<root>/tanganke/clip-vit-base-patch32_<task>` (or the hub
cache `<root>/models--…`), read and converted by storage/hf_checkpoints.py.

The safetensors layout is written once by `convert_to_safetensors` (src/convert_checkpoints.py) and read key
by key afterwards (`SafetensorsReader`, storage/safetensors_reader.py, re-exported here);
`CheckpointSet.discover` prefers it when it is complete and up to date (each file records the
digest of the original it came from; a changed original makes it stale).
task_vectors files are pickled modules and go through the restricted unpickler (`safe_pickle`);
torch.load is only ever called with weights_only on.

Encoder state dicts always come out with task_vectors' keys `model.<open_clip key>`; heads as
`{"weight", "bias"}`. A bare open_clip CLIP state dict (keys `visual.…`, no `model.` prefix) is
read as the CLIP inside an ImageEncoder: its text transformer (`transformer.*`) and `attn_mask`
are dropped, exactly as ImageEncoder deletes that tower, and every other key gets `model.`.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import struct
import warnings
from dataclasses import dataclass, field
from typing import Mapping

import torch

from taskmerge.storage import atomic, digests, safe_pickle
from taskmerge.storage.hf_checkpoints import (clip_model_config, convert_image_encoder,
                                              find_fusionbench_folders, read_hf_checkpoint,
                                              weight_files, with_pretrained_parts)
from taskmerge.storage.safe_pickle import CheckpointError
from taskmerge.storage.safetensors_reader import SafetensorsReader

FAMILIES = ("safetensors", "task_vectors", "tall_masks", "fusionbench")
CONVERTED_DIR = "safetensors"
_FORMAT_TAG = "taskmerge-checkpoint-v1"
_README = 'see the README section "Real checkpoints"'


# --- single files --------------------------------------------------------------------------------

def checkpoint_format(path: str) -> str:
    """'safetensors', 'torch-zip' or 'pickle' (legacy torch.save or plain pickle.dump)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found; {_README}") from None
    except OSError as e:  # a folder, a file without read permission, ...
        raise CheckpointError(f"{path}: cannot read this file ({e})") from None
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    if len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < size:
        return "safetensors"
    if str(path).endswith(".safetensors"):
        return "safetensors"  # let safetensors name what is wrong with it
    if head[:1] == b"\x80":
        return "pickle"
    raise CheckpointError(f"{path}: not a safetensors, torch or pickle file "
                          f"({len(head)} leading bytes {head!r}); is it truncated or corrupt?")


def _owned(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU tensor owning its memory (views of shared storages would break saving)."""
    t = tensor.detach().cpu().resolve_conj().resolve_neg().contiguous()
    if t.storage_offset() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.clone()
    return t


def _as_state_dict(obj, path: str) -> dict[str, torch.Tensor]:
    if safe_pickle.is_stand_in(obj):
        return safe_pickle.module_state_dict(obj, path)
    if isinstance(obj, Mapping) and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                        for k, v in obj.items()):
        return dict(obj)
    raise CheckpointError(f"{path}: holds a {type(obj).__name__}, expected a state dict "
                          f"(str -> tensor) or a pickled module")


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint file, keys as stored (a pickled module gives its state dict)."""
    path = str(path)
    fmt = checkpoint_format(path)
    if fmt == "safetensors":
        reader = SafetensorsReader(path)
        return {k: _owned(reader[k]) for k in reader}
    obj = None
    if fmt == "torch-zip":
        safe_pickle.check_zip_crc(path)  # torch.load does not check it
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            obj = None  # a pickled module: weights_only refuses it, the unpickler below reads it
        except Exception as e:
            raise CheckpointError(f"{path}: cannot read this torch file ({type(e).__name__}: "
                                  f"{e}); it is truncated or corrupt") from e
    if obj is None:
        obj = safe_pickle.load_pickled_checkpoint(path)
    return {k: _owned(v) for k, v in _as_state_dict(obj, path).items()}


def _encoder_key_map(keys: list[str], source: str) -> dict[str, str]:
    """{task_vectors key: stored key} for an image-encoder checkpoint (see the module docstring)."""
    if any(k.startswith("model.visual.") for k in keys):
        return {k: k for k in keys}
    if any(k.startswith("visual.") for k in keys) and not any(k.startswith("model.") for k in keys):
        return {"model." + k: k for k in keys
                if not k.startswith("transformer.") and k != "attn_mask"}
    raise CheckpointError(f"{source}: not an open_clip image encoder (no 'model.visual.*' keys; "
                          f"first keys {keys[:3]}); Hugging Face / FusionBench checkpoints are read "
                          f"as model folders (family 'fusionbench', METHODS.md §4.3), not as files")


def load_encoder_state_dict(path: str) -> dict[str, torch.Tensor]:
    """An image-encoder checkpoint as a state dict with keys `model.<open_clip key>`."""
    sd = load_state_dict(path)
    return {new: sd[old] for new, old in _encoder_key_map(list(sd), str(path)).items()}


def load_head(path: str) -> dict[str, torch.Tensor]:
    """A classification head (pickled module or state dict) as {"weight": C×d, "bias": C}."""
    sd = load_state_dict(path)
    weight = sd.get("weight")
    if weight is None or set(sd) - {"weight", "bias"} or weight.ndim != 2:
        raise CheckpointError(f"{path}: not a classification head (keys {sorted(sd)[:4]}; expected "
                              f"'weight' of shape classes×dim and 'bias')")
    bias = sd.get("bias", torch.zeros(weight.shape[0], dtype=weight.dtype))
    if tuple(bias.shape) != (weight.shape[0],):
        raise CheckpointError(f"{path}: head bias has shape {tuple(bias.shape)}, "
                              f"expected ({weight.shape[0]},)")
    return {"weight": weight, "bias": bias}


def open_state_dict(path: str, encoder: bool = False) -> Mapping[str, torch.Tensor]:
    """A lazy reader for .safetensors (key by key); other formats are loaded fully into a dict.

    With `encoder=True` the keys are the image encoder's `model.<open_clip key>`.
    """
    path = str(path)
    if checkpoint_format(path) == "safetensors":
        reader = SafetensorsReader(path)
        return SafetensorsReader(path, _encoder_key_map(list(reader), path)) if encoder else reader
    return load_encoder_state_dict(path) if encoder else load_state_dict(path)


def file_digest(path: str) -> str:
    """A content digest for cache keys: sha256 of the file's bytes (`digests.content_digest`,
    remembered by size, mtime, ctime and inode, so each file is read once). A Hugging Face model
    folder is digested by the files its weights are read from (config, weights or shards).
    """
    if os.path.isdir(path):
        h = hashlib.sha256()
        for file in weight_files(path):
            h.update(f"{os.path.basename(file)}:{file_digest(file)}".encode())
        return h.hexdigest()[:32]
    return digests.content_digest(path)


def _same_source(path: str, recorded) -> bool:
    """Whether `recorded` (a converted file's `source_digest`) is `path`'s digest; files converted
    by an older taskmerge recorded the size/mtime/head/tail fingerprint, accepted as it was."""
    return recorded == file_digest(path) or recorded == digests.legacy_fingerprint(path)


# --- validation ----------------------------------------------------------------------------------

def _shape(reader: Mapping, key: str) -> tuple[int, ...]:
    return reader.shape(key) if hasattr(reader, "shape") else tuple(reader[key].shape)


def _dtype(reader: Mapping, key: str) -> torch.dtype:
    return reader.dtype(key) if hasattr(reader, "dtype") else reader[key].dtype


def _check_finite(tensor: torch.Tensor, source: str, key: str) -> None:
    if not tensor.is_floating_point() or tensor.numel() == 0:
        return
    # min and max propagate NaN and are ±Inf if any element is: one fused reduction, no copy
    # (a float64 sum would convert the whole tensor first, 15× slower on 25M floats).
    low, high = torch.aminmax(tensor)
    if bool(torch.isfinite(low)) and bool(torch.isfinite(high)):
        return
    bad = int((~torch.isfinite(tensor)).sum())
    raise CheckpointError(f"{source}: key {key!r} has {bad} NaN/Inf values; "
                          f"the checkpoint is broken (re-download or re-train it)")


def validate_experts(pretrained: Mapping[str, torch.Tensor],
                     finetuned: Mapping[str, Mapping[str, torch.Tensor]],
                     sources: Mapping[str, str] | None = None, check_values: bool = True) -> None:
    """Fail before any merge if the experts do not fit the pre-trained model.

    Every fine-tuned state dict must have the pre-trained keys, and per key the same shape and
    dtype; floating tensors must be finite. `sources` names the files (`sources["pretrained"]`,
    `sources[task]`). Reads one tensor at a time, so lazy readers keep memory at one tensor.
    """
    sources = dict(sources or {})
    base = sources.get("pretrained", "the pre-trained checkpoint")
    keys = list(pretrained.keys())
    for task, expert in finetuned.items():
        src = sources.get(task, f"the {task} checkpoint")
        missing = [k for k in keys if k not in expert]
        unexpected = [k for k in expert.keys() if k not in pretrained]
        if missing or unexpected:
            raise CheckpointError(f"{src}: keys differ from {base}: missing {missing[:3]}, "
                                  f"unexpected {unexpected[:3]}; is it a checkpoint of another "
                                  f"model or family?")
    for key in keys:
        shape, dtype = _shape(pretrained, key), _dtype(pretrained, key)
        for task, expert in finetuned.items():
            src = sources.get(task, f"the {task} checkpoint")
            if _shape(expert, key) != shape:
                raise CheckpointError(f"{src}: key {key!r} has shape {_shape(expert, key)}, "
                                      f"{base} has {shape}; is it a checkpoint of another model?")
            if _dtype(expert, key) != dtype:
                raise CheckpointError(f"{src}: key {key!r} has dtype {_dtype(expert, key)}, "
                                      f"{base} has {dtype}; convert both to the same precision")
    if check_values:
        for key in keys:
            _check_finite(pretrained[key], base, key)
            for task, expert in finetuned.items():
                _check_finite(expert[key], sources.get(task, f"the {task} checkpoint"), key)


# --- layouts -------------------------------------------------------------------------------------

def _layout(family: str, model_dir: str, tasks: tuple[str, ...]):
    """(pre-trained candidates, {task: fine-tuned path}, {task: [head candidates]}) of a family."""
    if family == "task_vectors":
        return ([os.path.join(model_dir, "zeroshot.pt")],
                {t: os.path.join(model_dir, t, "finetuned.pt") for t in tasks},
                {t: [os.path.join(model_dir, f"head_{t}.pt"),
                     os.path.join(model_dir, f"head_{t}Val.pt")] for t in tasks})
    if family == "tall_masks":  # the originals always read the zero-shot model from MNISTVal
        folders = ["MNISTVal"] + [f"{t}Val" for t in tasks if t != "MNIST"]
        return ([os.path.join(model_dir, d, "nonlinear_zeroshot.pt") for d in folders],
                {t: os.path.join(model_dir, f"{t}Val", "nonlinear_finetuned.pt") for t in tasks},
                {t: [os.path.join(model_dir, f"head_{t}Val.pt"),
                     os.path.join(model_dir, f"head_{t}.pt")] for t in tasks})
    if family == "safetensors":
        folder = os.path.join(model_dir, CONVERTED_DIR)
        return ([os.path.join(folder, "zeroshot.safetensors")],
                {t: os.path.join(folder, f"{t}.safetensors") for t in tasks},
                {t: [os.path.join(folder, f"head_{t}.safetensors")] for t in tasks})
    raise ValueError(f"unknown checkpoint family {family!r}; expected one of {FAMILIES}")


def expected_layout(root: str = "<root>", model_name: str = "<model>") -> str:
    m = os.path.join(root, model_name)
    return (f"  task_vectors: {m}/zeroshot.pt, {m}/<Task>/finetuned.pt, {m}/head_<Task>.pt\n"
            f"  tall_masks:   {m}/MNISTVal/nonlinear_zeroshot.pt, "
            f"{m}/<Task>Val/nonlinear_finetuned.pt, {m}/head_<Task>Val.pt\n"
            f"  converted:    {m}/{CONVERTED_DIR}/zeroshot.safetensors, "
            f"{m}/{CONVERTED_DIR}/<Task>.safetensors, {m}/{CONVERTED_DIR}/head_<Task>.safetensors "
            f"(written by src/convert_checkpoints.py)\n"
            f"  fusionbench:  {root}/openai/clip-vit-base-patch32, "
            f"{root}/tanganke/clip-vit-base-patch32_<task> (`hf download --local-dir`, or the hub "
            f"cache {root}/models--…), -patch16 / -large-patch14 for ViT-B-16 / ViT-L-14")


def _stale(converted: str, root: str) -> str | None:
    """The original a converted file came from, if that original has changed since (else None).

    Compared by the digest recorded at conversion, so a restored or copied original whose bytes
    and times are unchanged still counts as converted; files not written by us are never stale.
    """
    metadata = SafetensorsReader(converted).metadata
    if metadata.get("format") != _FORMAT_TAG:
        return None
    if not isinstance(metadata.get("source"), str):
        raise CheckpointError(f"{converted}: its __metadata__ has no 'source' record naming the "
                              f"original; the file is corrupt: delete it and re-run "
                              f"src/convert_checkpoints.py")
    original = os.path.join(root, metadata["source"])
    if os.path.exists(original) and not _same_source(original, metadata.get("source_digest")):
        return original
    return None


@dataclass(frozen=True)
class CheckpointSet:
    """The pre-trained and fine-tuned checkpoints (and head files) of one model and task list."""
    root: str
    model_name: str
    tasks: tuple[str, ...]
    family: str                       # the layout read: task_vectors | tall_masks | safetensors | fusionbench
    zeroshot_path: str                # (fusionbench: the model folders, not files)
    finetuned_paths: dict[str, str] = field(default_factory=dict)
    origin: str = "unknown"           # who fine-tuned them: task_vectors | tall_masks | fusionbench (§8.12)
    # fusionbench: the pre-trained CLIPModel, read once (every expert takes its projection from it)
    _hf_pretrained: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def discover(cls, root: str, model_name: str, tasks,
                 family: str | tuple[str, ...] = "auto") -> "CheckpointSet":
        """Find the checkpoints of `tasks` in the first complete layout of `family`.

        "auto" tries the converted layout, then task_vectors, then tall_masks, then fusionbench; a
        converted set whose originals changed since conversion is skipped with a warning. One family
        name forces it.
        """
        tasks = tuple(tasks)
        model_dir = os.path.join(str(root), model_name)
        order = FAMILIES if family == "auto" else (family,) if isinstance(family, str) else family
        unknown = [f for f in order if f not in FAMILIES]
        if unknown:
            raise ValueError(f"unknown checkpoint family {unknown[0]!r}; expected one of {FAMILIES}")
        problems = []
        for fam in order:
            if fam == "fusionbench":
                try:
                    found, experts = find_fusionbench_folders(str(root), model_name, tasks)
                except CheckpointError as e:
                    problems.append(f"  {fam}: {e}")
                    continue
                return cls(str(root), model_name, tasks, fam, found, experts, fam)
            zeroshot, finetuned, _ = _layout(fam, model_dir, tasks)
            found = next((p for p in zeroshot if os.path.exists(p)), None)
            missing = ([] if found else zeroshot[:1]) + [p for p in finetuned.values()
                                                          if not os.path.exists(p)]
            if missing:
                problems.append(f"  {fam}: missing {', '.join(missing[:3])}"
                                + (f" and {len(missing) - 3} more" if len(missing) > 3 else ""))
                continue
            origin = fam
            if fam == "safetensors":
                stale = [s for p in [found, *finetuned.values()] if (s := _stale(p, str(root)))]
                if stale:
                    msg = (f"converted checkpoints in {os.path.dirname(found)} are out of date: "
                           f"{stale[0]} changed since; re-run src/convert_checkpoints.py")
                    if len(order) > 1:
                        warnings.warn(msg + "; reading the original files instead", stacklevel=2)
                        problems.append(f"  {fam}: out of date ({stale[0]} changed)")
                        continue
                    warnings.warn(msg, stacklevel=2)
                origin = SafetensorsReader(found).metadata.get("family", "unknown")
            return cls(str(root), model_name, tasks, fam, found, dict(finetuned), origin)
        raise CheckpointError(
            f"no complete set of checkpoints for {model_name} under {root!r} "
            f"(tasks {', '.join(tasks)}):\n" + "\n".join(problems)
            + f"\nExpected one of these layouts:\n{expected_layout(str(root), model_name)}\n"
            + 'See the README section "Real checkpoints" for where to get them.')

    @property
    def model_dir(self) -> str:
        return os.path.join(self.root, self.model_name)

    def finetuned_path(self, task: str) -> str:
        if task not in self.finetuned_paths:
            raise KeyError(f"task {task!r} is not in this checkpoint set ({', '.join(self.tasks)})")
        return self.finetuned_paths[task]

    def pretrained(self) -> Mapping[str, torch.Tensor]:
        """θ0 as a lazy reader (safetensors, fusionbench) or a dict (.pt files are read whole)."""
        if self.family == "fusionbench":
            base = self._hf_base()
            return convert_image_encoder(base.tensors, base.config, base.folder)
        return open_state_dict(self.zeroshot_path, encoder=True)

    def finetuned(self, task: str) -> Mapping[str, torch.Tensor]:
        """θ_t of `task`, like `pretrained()` (a FusionBench expert completed by θ0's projection)."""
        if self.family == "fusionbench":
            expert = with_pretrained_parts(read_hf_checkpoint(self.finetuned_path(task)),
                                           self._hf_base())
            return convert_image_encoder(expert.tensors, expert.config, expert.folder)
        return open_state_dict(self.finetuned_path(task), encoder=True)

    def model_config(self) -> dict | None:
        """fusionbench: the open_clip config of the pre-trained CLIPModel's config.json (what the
        run must build, models/hf_encoders.py `checkpoint_arch`); None for the file layouts."""
        if self.family != "fusionbench":
            return None
        return clip_model_config(self._hf_base())

    def _hf_base(self):
        if "checkpoint" not in self._hf_pretrained:
            base = read_hf_checkpoint(self.zeroshot_path)
            if base.architecture != "CLIPModel":
                raise CheckpointError(f"{base.folder}: the pre-trained model must be a full CLIPModel "
                                      f"(its projection and text tower), found {base.architecture}")
            self._hf_pretrained["checkpoint"] = base
        return self._hf_pretrained["checkpoint"]

    @property
    def sources(self) -> dict[str, str]:
        """{"pretrained": path, task: path}, the file names `validate_experts` reports."""
        return {"pretrained": self.zeroshot_path, **self.finetuned_paths}

    def validate(self, check_values: bool = True) -> None:
        validate_experts(self.pretrained(), {t: self.finetuned(t) for t in self.tasks},
                         self.sources, check_values)

    def head_path(self, task: str) -> str:
        """The head file of `task`: the first that exists, else where a built head should go."""
        model_dir = self.model_dir
        if self.family == "safetensors":
            converted = _layout("safetensors", model_dir, (task,))[2][task][0]
            if os.path.exists(converted) and not _stale(converted, self.root):
                return converted
        native = "tall_masks" if "tall_masks" in (self.family, self.origin) else "task_vectors"
        originals = _layout(native, model_dir, (task,))[2][task]
        return next((p for p in originals if os.path.exists(p)), originals[0])

    def head(self, task: str) -> dict[str, torch.Tensor]:
        return load_head(self.head_path(task))


# --- conversion ----------------------------------------------------------------------------------

def convert_to_safetensors(root: str, model_name: str, tasks, out: str | None = None,
                           family: str = "auto") -> dict[str, list[str]]:
    """Convert a task_vectors / tall_masks folder to `<root>/<model>/safetensors/` once.

    Writes zeroshot.safetensors, <Task>.safetensors and head_<Task>.safetensors (heads only where a
    head file exists), with metadata naming the source file and its digest. A file whose source
    digest is unchanged is skipped. All or nothing: if one file is refused, `out` is left as it
    was (or absent). Returns {"written": [...], "skipped": [...]}.
    """
    from safetensors import safe_open
    from tqdm import tqdm
    if family == "safetensors":
        raise ValueError("convert_to_safetensors reads the original layouts, not the converted one")
    tasks = tuple(tasks)
    originals = ("task_vectors", "tall_masks") if family == "auto" else family
    source = CheckpointSet.discover(root, model_name, tasks, family=originals)
    out = out or os.path.join(str(root), model_name, CONVERTED_DIR)
    jobs = [("encoder", source.zeroshot_path, os.path.join(out, "zeroshot.safetensors"))]
    jobs += [("encoder", source.finetuned_paths[t], os.path.join(out, f"{t}.safetensors"))
             for t in tasks]
    for t in tasks:
        head = source.head_path(t)
        if os.path.exists(head):
            jobs.append(("head", head, os.path.join(out, f"head_{t}.safetensors")))
    done: dict[str, list[str]] = {"written": [], "skipped": []}
    todo = []
    for kind, src, dst in jobs:
        digest = file_digest(src)
        if os.path.exists(dst):
            try:
                with safe_open(dst, framework="pt") as f:
                    if _same_source(src, (f.metadata() or {}).get("source_digest")):
                        done["skipped"].append(dst)
                        continue
            except Exception:
                pass  # unreadable: convert again
        todo.append((kind, src, dst, digest))
    if not todo:
        return done
    # All or nothing: the files are written into a copy of `out` that replaces it only once every
    # one of them converted, so a refused file leaves the previous folder (or none) as it was.
    with atomic.atomic_folder(out) as staging:
        for kind, src, dst, digest in tqdm(todo, desc=f"converting {model_name}", unit="file"):
            tensors = load_encoder_state_dict(src) if kind == "encoder" else load_head(src)
            metadata = {"format": _FORMAT_TAG, "kind": kind, "family": source.family,
                        "source": os.path.relpath(src, str(root)), "source_digest": digest,
                        "key_order": json.dumps(list(tensors))}
            atomic.save_safetensors(tensors, os.path.join(staging, os.path.basename(dst)),
                                    metadata=metadata)
            done["written"].append(dst)
            del tensors
    return done


__all__ = ["CheckpointError", "FAMILIES", "CheckpointSet", "SafetensorsReader", "checkpoint_format",
           "load_state_dict", "load_encoder_state_dict", "load_head", "open_state_dict",
           "validate_experts", "file_digest", "expected_layout", "convert_to_safetensors"]
