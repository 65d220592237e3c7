"""What every entry script needs before and after its method: which model, checkpoints and data to
use (and how its images are preprocessed), the evaluation of a state dict on every task, and the
run's log and report. The heads are runs/heads.py's.

`model_name = "auto"` picks ViT-B-32 when its checkpoints are under `checkpoint_dir`, and otherwise
the embedded offline benchmark (building it on first use), so every script runs on a laptop CPU
before a single checkpoint has been downloaded.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch.utils.data import TensorDataset

from taskmerge.datasets.parquet import HF_SOURCES, get_parquet_task
from taskmerge.datasets.registry import BENCHMARKS, PAPER_8, REAL_TASKS, get_task
from taskmerge.merging.tall_masks import released_mask_names
from taskmerge.models.encoders import TINY_MODEL, build_image_encoder, eval_transform
from taskmerge.models.heads import ClassificationHead
from taskmerge.models.hf_encoders import checkpoint_arch
from taskmerge.models.preprocessing import PREPROCESSING, clip_image_processor
from taskmerge.runs import validation
from taskmerge.adaptive.adaptation_data import TaskImages
from taskmerge.compute import cpu_paths, distributed
from taskmerge.compute.devices import device_description
from taskmerge.runs.evaluation import LoaderSettings, evaluate
from taskmerge.runs.identity import as_json, data_identity, differing_fields, head_digest, short_hash
from taskmerge.runs.reporting import RunLogger, log_path, method_label, results_table
from taskmerge.storage import atomic
from taskmerge.storage.digests import cache_dir as user_cache_dir
from taskmerge.storage.checkpoints import CheckpointSet, file_digest
from taskmerge.storage.errors import ConfigError
from taskmerge.storage.hf_checkpoints import FUSIONBENCH_MODELS

EMBEDDED_MODELS = (TINY_MODEL, TINY_MODEL + "-micro")
DATA_FORMATS = ("folders", "parquet")


@dataclass
class Setup:
    """The resolved model, checkpoints, tasks and data of one run."""
    model_name: str          # the checkpoint folder name (e.g. ViT-B-32, taskmerge-tiny)
    arch: str                # the open_clip architecture it is built with (fusionbench: as its
                             # config.json says, e.g. ViT-B-32+gelu; models/hf_encoders.py)
    checkpoints: CheckpointSet
    tasks: list[str]
    data_location: str
    embedded: bool
    micro: bool = False
    data_format: str = "folders"   # the real tasks' format: folders | parquet (embedded: ignored)
    trust_label_order: bool = False  # class names that match none of ours: taken to be in our order
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    loader: LoaderSettings = field(default_factory=LoaderSettings)
    cache_root: str = ""     # where caches are written (resolve_cache_dir); "" = the model folder
    _encoder_cache: dict = field(default_factory=dict, repr=False)
    _data_cache: dict = field(default_factory=dict, repr=False)

    @property
    def model_dir(self) -> str:
        return self.checkpoints.model_dir

    @property
    def cache_dir(self) -> str:
        """Where built heads, expert accuracies, learned coefficients and features are cached."""
        return self.cache_root or self.model_dir

    @property
    def family(self) -> str:
        return "embedded" if self.embedded else self.checkpoints.family

    @property
    def preprocessing(self) -> str:
        """open_clip's eval transform, or on the fusionbench family transformers' CLIPImageProcessor
        as FusionBench applies it (models/preprocessing.py)."""
        return PREPROCESSING[1] if self.family == "fusionbench" else PREPROCESSING[0]

    def describe(self) -> dict:
        return {"model": self.model_name, "arch": self.arch, "checkpoint_family": self.family,
                "model_dir": self.model_dir, "cache_dir": self.cache_dir, "tasks": self.tasks,
                "data_location": self.data_location,
                "data_format": "embedded" if self.embedded else self.data_format,
                "preprocessing": self.preprocessing, "compute": self.compute()}

    def compute(self) -> dict:
        """Where the run computes: device, GPU, torch / CUDA versions, TF32, ranks, loader workers."""
        where = {**device_description(self.device), "world_size": distributed.world_size(),
                 "backend": distributed.backend(), "num_workers": self.loader.num_workers}
        if self.device.type == "cpu":
            where.update(cpu_paths.describe())
        return where


def _real_checkpoints_present(checkpoint_dir: str, model_name: str) -> bool:
    folder = os.path.join(checkpoint_dir, model_name)
    repo = "models--openai--" + FUSIONBENCH_MODELS[model_name]
    return any(os.path.exists(os.path.join(folder, f)) for f in
               ("zeroshot.pt", os.path.join("MNISTVal", "nonlinear_zeroshot.pt"),
                os.path.join("safetensors", "zeroshot.safetensors"))) or any(
        os.path.isdir(os.path.join(checkpoint_dir, d)) for d in
        (os.path.join("openai", FUSIONBENCH_MODELS[model_name]), repo, os.path.join("hub", repo)))


def resolve_tasks(tasks: list[str] | str | None) -> list[str] | None:
    """A `tasks` setting as a task list: a list as given, a benchmark name ("TALL14": the first 14
    of the tall_masks order, as its `num_tasks=14`; see datasets.registry.BENCHMARKS) as its list,
    and [] / None as None (the model's own benchmark)."""
    if isinstance(tasks, str):
        if tasks not in BENCHMARKS:
            raise ConfigError(f"setting tasks={tasks!r}: not a benchmark name; give a list of tasks or "
                              f"one of {', '.join(map(repr, BENCHMARKS))} (the first 8 / 14 / 20 of "
                              f"the tall_masks order; PAPER8: the 8 paper tasks in the EnnengYang order)")
        return list(BENCHMARKS[tasks])
    return list(tasks) if tasks else None


def resolved_model_name(model_name: str, checkpoint_dir: str) -> str:
    """The model a `model_name` setting names: "auto" is ViT-B-32 where its checkpoints are, else
    the embedded benchmark."""
    if model_name != "auto":
        return model_name
    return "ViT-B-32" if _real_checkpoints_present(checkpoint_dir, "ViT-B-32") else TINY_MODEL


def resolve_setup(model_name: str = "auto", checkpoint_dir: str = "checkpoints",
                  data_location: str = "data", tasks: list[str] | str | None = None,
                  data_format: str = "folders", trust_label_order: bool = False) -> Setup:
    """Find the model's checkpoints (building the embedded benchmark if that is what is asked).
    `tasks` is a list, a benchmark name (`resolve_tasks`) or None (the paper's 8, or the embedded
    benchmark's tasks). `data_format` is how the real tasks are stored under `data_location`:
    "folders" (the originals' layouts, datasets/real.py) or "parquet" (the Hugging Face
    snapshots, datasets/parquet.py). `trust_label_order`: data whose class names match none of
    ours (or FusionBench's) is used as if in our order, instead of being refused."""
    named = tasks if isinstance(tasks, str) else None
    tasks = resolve_tasks(tasks)
    if data_format not in DATA_FORMATS:
        raise ConfigError(f"setting data_format={data_format!r}: expected one of {DATA_FORMATS}")
    if model_name == "auto":
        model_name = resolved_model_name(model_name, checkpoint_dir)
        if model_name == TINY_MODEL:
            print(f"No ViT-B-32 checkpoints under {checkpoint_dir}/ViT-B-32: using the embedded "
                  f"offline benchmark ({TINY_MODEL}). See README 'Real checkpoints' to use real ones.")
    embedded = model_name in EMBEDDED_MODELS
    if embedded and named:
        raise ConfigError(f"setting tasks={named!r}: {model_name} is the embedded offline benchmark, "
                          f"whose tasks are its own; set tasks=[] (all of them) or a list of them, or "
                          f"model_name to a real model to run the {named} tasks")
    if embedded:
        from taskmerge.embedded.build import ensure_embedded_benchmark
        micro = model_name.endswith("-micro")
        with distributed.main_first():  # rank 0 builds it; the other ranks then find it built
            model_dir = ensure_embedded_benchmark(checkpoint_dir, data_location, micro=micro)
        with open(os.path.join(model_dir, "manifest.json")) as f:
            built = json.load(f)["tasks"]
        tasks = list(tasks or built)
        missing = [t for t in tasks if t not in built]
        if missing:
            raise ConfigError(f"setting tasks={tasks!r}: {missing} are not in the embedded benchmark "
                              f"{model_dir}; choose from {built} (or [] for all)")
        checkpoints = CheckpointSet.discover(checkpoint_dir, model_name, tasks)
        return Setup(model_name, TINY_MODEL, checkpoints, tasks, data_location, True, micro)
    tasks = list(tasks or PAPER_8)
    readable = list(HF_SOURCES) if data_format == "parquet" else REAL_TASKS
    unknown = [t for t in tasks if t not in readable]
    if unknown:
        raise ConfigError(f"setting tasks={tasks!r}: {unknown} are not tasks taskmerge can read "
                          f"with data_format={data_format!r}; choose from {readable} (or [] for the "
                          f"paper's 8)")
    checkpoints = CheckpointSet.discover(checkpoint_dir, model_name, tasks)
    arch = model_name
    if checkpoints.family == "fusionbench":  # the model its config.json describes (hf_encoders.py)
        arch = checkpoint_arch(model_name, checkpoints.model_config(),
                               os.path.join(checkpoints.zeroshot_path, "config.json"))
    return Setup(model_name, arch, checkpoints, tasks, data_location, False,
                 data_format=data_format, trust_label_order=trust_label_order)


def resolve_cache_dir(setting: str, setup: Setup) -> tuple[str, str]:
    """(folder, why) of the run's caches. "auto": the model folder while it is writable (as the
    originals keep heads beside the checkpoints), else a folder of this model in the user's cache
    (storage/digests.cache_dir: TASKMERGE_CACHE_DIR, XDG_CACHE_HOME or ~/.cache), so a read-only
    shared model store can be used; a path: `<path>/<model name>`."""
    if setting != "auto":
        return os.path.join(setting, setup.model_name), "cache_dir setting"
    reason = atomic.write_refusal(setup.model_dir)
    if reason is None:
        return setup.model_dir, "the model folder"
    where = os.path.abspath(setup.model_dir)
    folder = os.path.join(user_cache_dir(), "models", f"{setup.model_name}-{short_hash(where, 8)}")
    return folder, f"the model folder {setup.model_dir} cannot be written: {reason}"


def released_masks_path(setup: Setup, use_ties: bool) -> str:
    """Where tall_masks' released `TALL_mask_<N>task.npy` is: its own rule (the checkpoint folder
    with "checkpoints" replaced by "tall_masks"), a `tall_masks/` folder inside it (the download's
    two folders side by side), or next to the checkpoints."""
    ckpt = setup.checkpoints
    if "tall_masks" not in (ckpt.family, ckpt.origin):
        raise ConfigError(f"setting load_mask=True reads the masks released with the tall_masks "
                          f"checkpoints, but these are {ckpt.family} checkpoints ({ckpt.model_dir}); "
                          f"set load_mask=False to compute their masks")
    root = os.path.normpath(ckpt.root)
    folders = [os.path.join(root.replace("checkpoints", "tall_masks"), setup.model_name),
               os.path.join(root, "tall_masks", setup.model_name), ckpt.model_dir]
    names = released_mask_names(len(setup.tasks), use_ties)
    candidates = [os.path.join(f, n) for f in dict.fromkeys(folders) for n in names]
    found = next((p for p in candidates if os.path.isfile(p)), None)
    if found is None:
        raise ConfigError(f"setting load_mask=True: no released TALL masks for {len(setup.tasks)} tasks; "
                          f"looked for {', '.join(candidates)}. Download them with the tall_masks "
                          f"checkpoints (README 'Real checkpoints'), or set load_mask=False")
    return found


def task_data(setup: Setup, task: str, split: str = "test"):
    """TaskData for `task` (`split="val"` gives the `<Task>Val` held-out validation split), read once
    per run: every evaluation of a split then sees the same Dataset (and its loader's workers)."""
    key = (task, split)
    if key not in setup._data_cache:
        setup._data_cache[key] = _read_task_data(setup, task, split)
    return setup._data_cache[key]


MAX_PRELOAD_BYTES = 2 << 30


def evaluation_split(setup: Setup, task: str, split: str = "test"):
    """(Dataset, LoaderSettings) to evaluate `task`'s split with. A validation split is searched over
    a grid (dozens of passes), so it is decoded and transformed once and kept as tensors when it
    fits in MAX_PRELOAD_BYTES; the values are the Dataset's own, so the accuracies are unchanged."""
    data = task_data(setup, task, split).test
    if split != "val":
        return data, setup.loader
    key = (task, split, "preloaded")
    if key not in setup._data_cache:
        setup._data_cache[key] = TaskImages(data, preload="auto", max_preload_bytes=MAX_PRELOAD_BYTES,
                                            num_workers=setup.loader.num_workers, name=f"{task}Val")
    images = setup._data_cache[key]
    if not images.preloaded:
        return data, setup.loader
    return TensorDataset(images.images, images.labels), LoaderSettings(pin_memory=setup.loader.pin_memory)


def image_transform(setup: Setup):
    """The run's image preprocessing (`Setup.preprocessing`): on the fusionbench family the one
    `CLIPProcessor.from_pretrained(<pretrained folder>)` gives (the folder's processor settings, else
    CLIPImageProcessor's defaults at the encoder's size), else open_clip's eval transform."""
    if setup.preprocessing == PREPROCESSING[1]:
        return clip_image_processor(setup.checkpoints.zeroshot_path, _image_size(setup))
    return eval_transform(_image_size(setup))


def _read_task_data(setup: Setup, task: str, split: str):
    name = task + "Val" if split == "val" else task
    transform = image_transform(setup)
    if setup.embedded:
        from taskmerge.embedded.tasks import get_embedded_task
        return get_embedded_task(name, setup.data_location, transform, micro=setup.micro)
    if setup.data_format == "parquet":
        return get_parquet_task(name, setup.data_location, transform, setup.trust_label_order)
    return get_task(name, setup.data_location, transform)


def _image_size(setup: Setup) -> int:
    return _encoder(setup).image_size


def _encoder(setup: Setup):
    """The run's one ImageEncoder module (weights are loaded into it per evaluation)."""
    enc = setup._encoder_cache.get("encoder")
    if enc is None:
        enc = setup._encoder_cache["encoder"] = build_image_encoder(setup.arch).to(setup.device)
    return enc


def fresh_encoder(setup: Setup, state_dict: Mapping[str, torch.Tensor] | None = None):
    """A new image encoder of the run's architecture (on the CPU), with `state_dict` loaded if given:
    for a model that is trained or differentiated, which the shared module of `encoder_for` is not."""
    return build_image_encoder(setup.arch, state_dict)


def validate_checkpoints(setup: Setup) -> None:
    """Every checkpoint against the architecture's encoder, before the first evaluation."""
    validation.validate_checkpoints(setup.checkpoints, _encoder(setup))


def encoder_for(setup: Setup, state_dict: Mapping[str, torch.Tensor]):
    """The image encoder with `state_dict` loaded (one module reused across calls)."""
    enc = _encoder(setup)
    enc.load_state_dict({k: state_dict[k] for k in enc.state_dict()}, strict=True)
    return enc.eval()


def evaluate_tasks(setup: Setup, state_dicts: Mapping[str, Mapping[str, torch.Tensor]] | Mapping[str, torch.Tensor],
                   heads: dict[str, ClassificationHead], batch_size: int = 128, split: str = "test",
                   per_task: bool = False) -> dict[str, float]:
    """Accuracy per task. `per_task=True`: `state_dicts[task]` is task t's own model (EMR, TSV-C,
    TALL need task identity); otherwise one merged state dict serves every task."""
    accs = {}
    for task in setup.tasks:
        sd = state_dicts[task] if per_task else state_dicts
        enc = encoder_for(setup, sd)
        data, loader = evaluation_split(setup, task, split)
        accs[task] = evaluate(enc, heads[task], data, batch_size, desc=f"eval {task}",
                              device=setup.device, loader=loader)
    return accs


def _read_json_cache(path: str, log) -> dict:
    """A JSON cache of `{hash: {"key": ..., ...}}` entries; one that cannot be read is a miss (said in
    one line), and is replaced when the entries are computed again."""
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        log(f"Cache {path} cannot be read ({type(e).__name__}); computing its entries again")
        return {}
    if not isinstance(data, dict):
        log(f"Cache {path} is not a cache of entries; computing its entries again")
        return {}
    # entries of the older, expert-only format are dropped
    return {k: v for k, v in data.items() if isinstance(v, dict) and isinstance(v.get("key"), dict)}


def individual_accuracies(setup: Setup, heads: dict[str, ClassificationHead], batch_size: int = 128,
                          split: str = "test", log=print) -> dict[str, float]:
    """Each expert on its own task, cached in the model folder, since every report divides by it
    (normalized accuracy). An entry is reused only for the same expert file, head values and data
    (the batch size does not change it); `log` says which tasks are recomputed, and why."""
    cache_path = os.path.join(setup.cache_dir, f"individual_accuracies_{split}.json")
    cache = _read_json_cache(cache_path, log)
    out, changed = {}, False
    for task in setup.tasks:
        data = task_data(setup, task, split).test
        key = {"task": task, "expert": file_digest(setup.checkpoints.finetuned_path(task)),
               "head": head_digest(heads[task]),
               "data": data_identity(task, split, setup.data_location, data)}
        entry = cache.get(short_hash(key))
        if not isinstance(entry, dict) or entry.get("key") != as_json(key):
            old = [e["key"] for e in cache.values() if e["key"].get("task") == task]
            why = (f"{', '.join(differing_fields(old[-1], as_json(key)))} changed" if old
                   else "not cached yet")
            log(f"Individual accuracy of {task} ({split}): computing ({why})")
            enc = encoder_for(setup, setup.checkpoints.finetuned(task))
            entry = {"key": as_json(key), "accuracy": evaluate(enc, heads[task], data, batch_size,
                                                               desc=f"expert {task}", device=setup.device,
                                                               loader=setup.loader)}
            cache[short_hash(key)] = entry
            changed = True
        out[task] = entry["accuracy"]
    if changed:
        atomic.write_json(cache_path, cache)
    return out


def start_run(config: dict, setup: Setup, script: str, method: str, subfolder: str = "run",
              log_dir: str = "src/logs") -> RunLogger:
    """Open the run's log with its full configuration (and the resolved setup) as the first line."""
    stem = os.path.splitext(os.path.basename(script))[0]
    path = log_path(log_dir, subfolder, setup.model_name, stem, method)
    logger = RunLogger(path, {**config, "resolved": setup.describe(), "argv": sys.argv[1:]})
    return logger


def finish_run(logger: RunLogger, setup: Setup, method: str, accs: dict[str, float],
               individual: dict[str, float] | None, **extra) -> dict:
    """Write the JSON report (per-task, average, normalized) and print the results table."""
    avg = sum(accs.values()) / len(accs)
    report = {"method": method, "model": setup.model_name, "checkpoint_family": setup.family,
              "preprocessing": setup.preprocessing, "tasks": setup.tasks, "accuracy": accs, "average_accuracy": avg, "compute": setup.compute()}
    if individual:
        norm = {t: accs[t] / individual[t] for t in accs if individual.get(t)}
        report["individual_accuracy"] = individual
        report["normalized_accuracy"] = norm
        report["average_normalized_accuracy"] = sum(norm.values()) / max(len(norm), 1)
    report.update(extra)
    label = method_label({"config": logger.config, **report})  # the summary's row name for this run
    logger.info(results_table({label: accs, **({"Individual": individual} if individual else {})},
                              setup.tasks))
    return logger.write_report(**report)
