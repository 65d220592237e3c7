"""The embedded benchmark's model: a tiny CLIP pretrained offline, its zero-shot heads and experts.

Nothing of real CLIP can be fetched here, so the benchmark grows its own: the tiny open_clip CLIP of
`model_configs/taskmerge-tiny.json` is pretrained contrastively on templated captions of the
embedded tasks' training images (`pretraining.py`), its zero-shot heads are built from the tasks'
templates with `heads.build_zeroshot_head` exactly as for real CLIP, and one expert per task is
fine-tuned from it with that head frozen (`finetuning.py`, the task_vectors protocol). The result
is written in the task_vectors layout, so every method runs the same code on it as on ViT-B/32:

    checkpoints/taskmerge-tiny/zeroshot.pt               ImageEncoder state dict (keys `model.…`)
    checkpoints/taskmerge-tiny/<Task>/finetuned.pt       the expert's ImageEncoder state dict
    checkpoints/taskmerge-tiny/head_<Task>.pt            {"weight", "bias"} of the zero-shot head
    checkpoints/taskmerge-tiny/clip_pretrained.safetensors   the full pretrained CLIP (text tower too)
    checkpoints/taskmerge-tiny/manifest.json             recipe, its hash, tasks, accuracies, timings

Data use: pretraining and fine-tuning both see only each task's `<Task>Val` training part (train
minus the validation split); no validation or test image is ever trained on.

Calibration: the aim is the ViT-B/32 regime (zero-shot ≈ 48 %, experts ≈ 90 %, Task Arithmetic
≈ 69 %), and the recipe below lands in it on the five default tasks (the pinned build: 45.6 %,
92.2 %, 73.7 % at λ = 0.3; on native paths 43.7 / 91.7 / 72.2 on one machine, 46.1 / 91.8 / 71.4 on
another). Three things got it there, each measured with a full build:
- caption noise 0.5 keeps zero-shot low while the image features still separate the classes;
- CLIP's BPE tokenizer, cut down to the captions' words (`models.PrunedBPETokenizer`), instead of
  a byte-level one: whole-word tokens give the class names distinct text embeddings (Task
  Arithmetic 44 → 56 %);
- 700 pretraining steps instead of 300: the longer-trained CLIP is far less disturbed by the other
  tasks' vectors (56 → 63 % at 450 steps, 73 % at 700; for real CLIP, too, the weight
  disentanglement that Task Arithmetic relies on comes from pretraining).
RoadSigns and Letters stay optional: the tiny CLIP learns neither well (experts 63 % and 22 %),
and over all seven tasks Task Arithmetic falls below zero-shot. The README has the table of what
was tried.

The micro benchmark (`micro=True`, for tests) runs the same code on the micro data set with a
small recipe and writes `checkpoints/taskmerge-tiny-micro/`.

Determinism: everything is seeded, the build runs with a fixed thread count (`BUILD_THREADS`) and
on the CPU code paths of `compute/cpu_paths.PINNED` (in a child process where this one started
without them), so the same recipe gives bit-identical files on every x86-64 machine with the same
PyTorch build; the manifest records their sha256 and README publishes them.

The manifest is written last and atomically: a build that was interrupted has no manifest (or one
with another recipe hash) and is resumed; finished stages are kept in `build_state.json` with the
hash of what they depend on, so changing only the fine-tuning recipe reuses the pretrained CLIP.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Subset

from taskmerge.compute import cpu_paths
from taskmerge.datasets.base import ArrayDataset
from taskmerge.embedded.pretraining import CaptionedImages, partner_classes
from taskmerge.models.encoders import TINY_MODEL, build_image_encoder, create_clip, eval_transform
from taskmerge.models.heads import ClassificationHead, build_zeroshot_head
from taskmerge.models.tokenizers import get_tokenizer
from taskmerge.storage import atomic

MICRO_MODEL = TINY_MODEL + "-micro"
# A fixed thread count (not the machine's): float sums then do not depend on the core count. Two
# threads make pretraining ~1.3× faster on 2 cores; the experts are fine-tuned in 2 single-threaded
# processes instead, which scales better.
BUILD_THREADS = 2
FINETUNE_WORKERS = 2

# CLIP's normalisation statistics, as in the eval transform (METHODS.md §1.2).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


# ---------------------------------------------------------------- preloaded task arrays
@dataclass
class TaskTensors:
    """One task preloaded as normalised tensors: `train` is the `<Task>Val` training part (what is
    trained on), `test` the task's test split (what is reported)."""
    name: str
    classnames: list[str]
    templates: list[str]
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def normalize_uint8(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 3) or (N, H, W) uint8 → (N, 3, H, W) float, as ToTensor + Normalize compute it."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.ndim == 3:
        x = x[..., None].expand(*x.shape, 3)
    x = x.permute(0, 3, 1, 2).float().div(255)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return x.sub(mean).div(std)


def _array_source(dataset) -> tuple[ArrayDataset, np.ndarray] | None:
    """The ArrayDataset under `dataset` (possibly a chain of Subsets) and the indices it selects."""
    indices = None
    while isinstance(dataset, Subset):
        idx = np.asarray(dataset.indices)
        indices = idx if indices is None else idx[indices]
        dataset = dataset.dataset
    if not isinstance(dataset, ArrayDataset):
        return None
    return dataset, (np.arange(len(dataset)) if indices is None else indices)


def dataset_tensors(dataset, image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All of a split as (normalised images, labels), read once.

    Images that are already `image_size` square skip PIL: the eval transform's resize and centre
    crop are then identities, and ToTensor + Normalize are vectorised (tested equal). Anything else
    goes through the dataset's own transform."""
    source = _array_source(dataset)
    if source is not None:
        base, idx = source
        if base.images.shape[1:3] == (image_size, image_size):
            return normalize_uint8(base.images[idx]), torch.from_numpy(base.labels[idx]).long()
    xs, ys = zip(*(dataset[i] for i in range(len(dataset))))
    return torch.stack(xs), torch.tensor(ys, dtype=torch.long)


def load_task_tensors(name: str, data_location: str, image_size: int, micro: bool) -> TaskTensors:
    from taskmerge.embedded.tasks import get_embedded_task
    transform = eval_transform(image_size)
    task = get_embedded_task(name, data_location, transform, micro=micro)
    val_task = get_embedded_task(name + "Val", data_location, transform, micro=micro)
    train_x, train_y = dataset_tensors(val_task.train, image_size)
    test_x, test_y = dataset_tensors(task.test, image_size)
    return TaskTensors(name, list(task.classnames), list(task.templates), train_x, train_y, test_x, test_y)


def caption_corpus(tasks: list[TaskTensors], tokenizer, extra_templates: tuple[str, ...] = (),
                   seed: int = 0) -> CaptionedImages:
    """The pretraining corpus: every task's training images, captioned by its templates (plus
    `extra_templates`), each class with its noise partner drawn with `seed`."""
    num_templates = max(len(t.templates) for t in tasks) + len(extra_templates)
    captions, counts, labels = [], [], []
    offset = 0
    for t in tasks:
        templates = list(t.templates) + list(extra_templates)
        for name in t.classnames:
            texts = [tpl.format(c=name) for tpl in templates]
            captions.append(tokenizer((texts * num_templates)[:num_templates]))
            counts.append(len(templates))
        labels.append(t.train_y + offset)
        offset += len(t.classnames)
    partner = partner_classes([len(t.classnames) for t in tasks], torch.Generator().manual_seed(seed))
    return CaptionedImages(images=torch.cat([t.train_x for t in tasks]), labels=torch.cat(labels),
                           captions=torch.stack(captions), num_templates=torch.tensor(counts),
                           partner=partner)


@torch.no_grad()
def _evaluate(encoder, head: ClassificationHead, images: torch.Tensor, labels: torch.Tensor,
              batch_size: int = 512) -> float:
    """Top-1 accuracy of head(encoder(x)) over preloaded images."""
    encoder.eval()
    correct = 0
    for i in range(0, len(labels), batch_size):
        logits = head(encoder(images[i:i + batch_size]))
        correct += int((logits.argmax(dim=1) == labels[i:i + batch_size]).sum())
    return correct / max(1, len(labels))


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- the recipe
# Bump when pretraining.py / finetuning.py / this file change what a build computes.
RECIPE_VERSION = 4

RECIPE = {
    "version": RECIPE_VERSION,
    "model": TINY_MODEL,
    "pretrain": {"steps": 700, "batch_size": 256, "lr": 2e-3, "weight_decay": 0.1, "warmup": 20,
                 "caption_noise": 0.5, "crop_scale": None, "grad_clip": 1.0, "seed": 0},
    "finetune": {"steps": 400, "batch_size": 64, "lr": 5e-4, "weight_decay": 0.1, "warmup": 20,
                 "crop_scale": [0.9, 1.0], "grad_clip": 1.0, "seed": 0},
    "eval_batch_size": 512,
}
MICRO_RECIPE = {
    "version": RECIPE_VERSION,
    "model": TINY_MODEL,
    "pretrain": {"steps": 40, "batch_size": 64, "lr": 1e-3, "weight_decay": 0.1, "warmup": 3,
                 "caption_noise": 0.5, "crop_scale": None, "grad_clip": 1.0, "seed": 0},
    # A few hundred images cannot teach much in seconds; a higher lr makes the experts move.
    "finetune": {"steps": 40, "batch_size": 32, "lr": 2e-3, "weight_decay": 0.1, "warmup": 4,
                 "crop_scale": [0.9, 1.0], "grad_clip": 1.0, "seed": 0},
    "eval_batch_size": 512,
}


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def data_fingerprint(task: TaskTensors) -> str:
    """Hash of what a build reads of a task: its images, labels, class names and templates."""
    h = hashlib.sha256(json.dumps([task.name, task.classnames, task.templates]).encode())
    for t in (task.train_x, task.train_y, task.test_x, task.test_y):
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def stage_hashes(recipe: dict, tasks: list[TaskTensors], paths: str = "pinned") -> dict[str, str]:
    """What each build stage depends on, hashed: the pretrained CLIP depends on the model config,
    the pretraining recipe, every task's data and the CPU code paths (`paths`: "pinned" or
    "native"); an expert on those, the fine-tuning recipe and its own task; "all" on the whole
    recipe and task list."""
    config = model_config(recipe["model"])
    data = {t.name: data_fingerprint(t) for t in tasks}
    pretrain = _hash([recipe["version"], recipe["model"], config, recipe["pretrain"], data, paths])
    stages = {"pretrain": pretrain}
    for t in tasks:
        stages[t.name] = _hash([pretrain, recipe["finetune"], t.name, data[t.name]])
    stages["all"] = _hash([recipe, config, data, paths])
    return stages


# ---------------------------------------------------------------- building
def _read_json(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _tqdm(progress: bool, **kwargs):
    from tqdm import tqdm
    return tqdm(disable=not progress, dynamic_ncols=True, **kwargs)


def model_config(model_name: str = TINY_MODEL) -> dict:
    """The open_clip config of `model_name` (taskmerge's own configs registered)."""
    import open_clip

    from taskmerge.models.encoders import _register_configs
    _register_configs()
    return open_clip.get_model_config(model_name)


def load_tasks(data_location: str, micro: bool = False, progress: bool = True,
               model_name: str = TINY_MODEL) -> list[TaskTensors]:
    """Every embedded task whose data can be built, preloaded; a task whose package is missing has
    already been reported in one line by `build_embedded_data` and is left out."""
    from taskmerge.embedded.tasks import build_embedded_data
    available = build_embedded_data(data_location, micro=micro, progress=progress)
    if not available:
        raise RuntimeError(f"no embedded task could be built under {data_location!r} (see the lines "
                           f"above for the packages to install; scripts/install.sh installs them all)")
    size = int(model_config(model_name)["vision_cfg"]["image_size"])
    return [load_task_tensors(name, data_location, size, micro) for name in available]


def _task_arithmetic(theta0: dict, experts: list[dict], lam: float) -> dict:
    # θ0 + λ Σ_t (θ_t − θ0) over every key (METHODS.md §2.2); only for the manifest's sanity check.
    return {k: theta0[k] + lam * sum(theta[k] - theta0[k] for theta in experts) for k in theta0}


def _save_if_changed(tensors: dict[str, torch.Tensor], path: str) -> None:
    """torch.save `tensors` unless `path` already holds exactly them (same keys, dtypes, bits)."""
    try:
        old = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        old = None
    if (isinstance(old, dict) and list(old) == list(tensors)
            and all(old[k].dtype == v.dtype and torch.equal(old[k], v) for k, v in tensors.items())):
        return
    atomic.torch_save(tensors, path)


def build_benchmark(folder: str, recipe: dict, tasks: list[TaskTensors], stages: dict[str, str],
                    progress: bool = True) -> dict:
    """Write the benchmark into `folder`, reusing the stages `build_state.json` marks as done with
    the same hashes; returns the manifest (written last)."""
    from safetensors.torch import load_file

    from taskmerge.embedded.finetuning import finetune_many
    from taskmerge.embedded.pretraining import pretrain_clip
    from taskmerge.models.encoders import ImageEncoder

    t_start = time.time()
    seconds: dict[str, float] = {}
    os.makedirs(folder, exist_ok=True)
    manifest_path = os.path.join(folder, "manifest.json")
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # from another recipe: the folder is no longer what it describes
    # AdaMerging's learned coefficients (`<folder>/adamerging/`) stay: each file records the expert,
    # head and data digests it was learned from, and `coefficients="auto"` reuses only a match. The
    # zero-shot model and heads are rewritten only when their values change, so that rebuilding a
    # lost head leaves every digest, and the coefficients of the experts that were kept, valid.
    state_path = os.path.join(folder, "build_state.json")
    state = _read_json(state_path) or {}
    model_name = recipe["model"]

    # 1. The pretrained CLIP (both towers).
    clip_path = os.path.join(folder, "clip_pretrained.safetensors")
    pre = recipe["pretrain"]
    if state.get("pretrain") == stages["pretrain"] and os.path.exists(clip_path):
        clip = create_clip(model_name)
        clip.load_state_dict(load_file(clip_path), strict=True)
    else:
        state = {}  # every later stage depends on the pretrained weights
        t0 = time.time()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(pre["seed"])
            clip = create_clip(model_name)
        corpus = caption_corpus(tasks, get_tokenizer(model_name))
        with _tqdm(progress, total=pre["steps"], desc="pretraining tiny CLIP", unit="step") as bar:
            pretrain_clip(clip, corpus, steps=pre["steps"], batch_size=pre["batch_size"], lr=pre["lr"],
                          weight_decay=pre["weight_decay"], warmup=pre["warmup"],
                          caption_noise=pre["caption_noise"], crop_scale=pre["crop_scale"],
                          grad_clip=pre["grad_clip"], seed=pre["seed"], progress=bar)
        atomic.save_safetensors(clip.state_dict(), clip_path, metadata={"stage_hash": stages["pretrain"]})
        state["pretrain"] = stages["pretrain"]
        atomic.write_json(state_path, state)
        seconds["pretrain"] = time.time() - t0

    # 2. Zero-shot heads from the pretrained text tower, and the zero-shot image encoder.
    t0 = time.time()
    tokenizer = get_tokenizer(model_name)
    heads = {}
    for t in tasks:
        heads[t.name] = build_zeroshot_head(clip, tokenizer, t.classnames, t.templates)
        _save_if_changed({"weight": heads[t.name].weight.detach().clone(),
                          "bias": heads[t.name].bias.detach().clone()},
                         os.path.join(folder, f"head_{t.name}.pt"))
    theta0 = {k: v.detach().clone() for k, v in ImageEncoder(clip).state_dict().items()}
    _save_if_changed(theta0, os.path.join(folder, "zeroshot.pt"))
    seconds["heads"] = time.time() - t0

    # 3. One expert per task: the vision tower fine-tuned through the frozen zero-shot head.
    ft = recipe["finetune"]
    experts, todo = {}, []
    for t in tasks:
        path = os.path.join(folder, t.name, "finetuned.pt")
        if state.get(t.name) == stages[t.name] and os.path.exists(path):
            experts[t.name] = torch.load(path, weights_only=True)
        else:
            todo.append(t)
    jobs = [{"encoder": build_image_encoder(model_name, theta0), "head": heads[t.name],
             "images": t.train_x, "labels": t.train_y,
             "recipe": {k: ft[k] for k in ("steps", "batch_size", "lr", "weight_decay", "warmup",
                                           "grad_clip", "crop_scale", "seed")}} for t in todo]
    t0 = time.time()
    with _tqdm(progress, total=ft["steps"] * len(todo), unit="step",
               desc=f"fine-tuning {len(todo)} experts") as bar:
        for t, expert in zip(todo, finetune_many(jobs, FINETUNE_WORKERS, bar)):
            experts[t.name] = expert
            atomic.torch_save(expert, os.path.join(folder, t.name, "finetuned.pt"))
            state[t.name] = stages[t.name]
            atomic.write_json(state_path, state)
    if todo:
        seconds["finetune"] = time.time() - t0
    experts = {t.name: experts[t.name] for t in tasks}

    # 4. Accuracies on every task's test split: zero-shot, own expert, Task Arithmetic (λ = 0.3).
    t0 = time.time()
    bs = recipe["eval_batch_size"]
    encoder = build_image_encoder(model_name, theta0)
    merged = _task_arithmetic(theta0, list(experts.values()), 0.3)
    acc = {"zeroshot": {}, "finetuned": {}, "task_arithmetic_0.3": {}}
    for t in tasks:
        for key, weights in (("zeroshot", theta0), ("finetuned", experts[t.name]),
                             ("task_arithmetic_0.3", merged)):
            encoder.load_state_dict(weights)
            acc[key][t.name] = _evaluate(encoder, heads[t.name], t.test_x, t.test_y, bs)
    for k in list(acc):
        acc[k] = {name: round(v, 4) for name, v in acc[k].items()}
        acc[k]["average"] = round(sum(acc[k].values()) / len(tasks), 4)
    seconds["evaluate"] = time.time() - t0
    seconds["total"] = time.time() - t_start

    import open_clip
    manifest = {
        "model": model_name,
        "folder": os.path.basename(os.path.normpath(folder)),
        "tasks": [t.name for t in tasks],
        "recipe": recipe,
        "recipe_hash": stages["all"],
        "stage_hashes": stages,
        "data": {t.name: {"fingerprint": data_fingerprint(t), "classes": len(t.classnames),
                          "train": len(t.train_y), "test": len(t.test_y)} for t in tasks},
        "accuracy": acc,
        "build_seconds": {k: round(v, 1) for k, v in seconds.items()},
        "environment": {"threads": torch.get_num_threads(), "torch": torch.__version__,
                        "open_clip": open_clip.__version__, **cpu_paths.describe()},
        "sha256": file_digests(folder, [t.name for t in tasks]),
    }
    atomic.write_json(manifest_path, manifest)
    return manifest


def built_files(tasks: list[str]) -> list[str]:
    """The files a build writes besides its manifest, relative to its folder."""
    return (["clip_pretrained.safetensors", "zeroshot.pt"] + [f"head_{t}.pt" for t in tasks]
            + [f"{t}/finetuned.pt" for t in tasks])


def file_digests(folder: str, tasks: list[str]) -> dict[str, str]:
    """{file: sha256} of a build's files (what README publishes, and what a user compares)."""
    digests = {}
    for name in built_files(tasks):
        h = hashlib.sha256()
        with open(os.path.join(folder, name), "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        digests[name] = h.hexdigest()
    return digests


def _is_complete(folder: str, stages: dict[str, str], tasks: list[TaskTensors]) -> bool:
    manifest = _read_json(os.path.join(folder, "manifest.json"))
    if manifest is None or manifest.get("recipe_hash") != stages["all"]:
        return False
    return all(os.path.exists(os.path.join(folder, f)) for f in built_files([t.name for t in tasks]))


def ensure_embedded_benchmark(checkpoint_dir: str = "checkpoints", data_location: str = "data",
                              micro: bool = False, progress: bool = True,
                              recipe: dict | None = None, pinned: bool = True) -> str:
    """The folder of the embedded benchmark (`<checkpoint_dir>/taskmerge-tiny[-micro]`), built first
    if it is missing, incomplete or from another recipe. `recipe` overrides `RECIPE`/`MICRO_RECIPE`.

    `pinned` (the default) builds on `compute/cpu_paths.PINNED`, the same bits on every x86-64 CPU:
    in this process if it started with them, else in a child process that has them. False builds
    here on this machine's native paths (tests that patch the build); the two are different builds
    (their stage hashes differ), so neither is taken for the other."""
    name = MICRO_MODEL if micro else TINY_MODEL
    recipe = recipe if recipe is not None else (MICRO_RECIPE if micro else RECIPE)
    folder = os.path.join(os.path.expanduser(os.fspath(checkpoint_dir)), name)
    paths = "pinned" if pinned else "native"
    with _threads(BUILD_THREADS):
        tasks = load_tasks(data_location, micro, progress, recipe["model"])
        stages = stage_hashes(recipe, tasks, paths)
        if _is_complete(folder, stages, tasks):
            return folder
        if pinned and not cpu_paths.is_pinned():
            _build_in_pinned_child(checkpoint_dir, data_location, micro, progress, recipe)
            if not _is_complete(folder, stages, tasks):
                raise RuntimeError(f"the pinned build of {folder} finished without a complete manifest")
            return folder
        if progress:
            print(f"Building the embedded benchmark {name} in {folder} "
                  f"({len(tasks)} tasks: {', '.join(t.name for t in tasks)}; {paths} CPU paths)")
        manifest = build_benchmark(folder, recipe, tasks, stages, progress)
        if progress:
            avg = {k: 100 * v["average"] for k, v in manifest["accuracy"].items()}
            print(f"Built {name} in {manifest['build_seconds']['total']:.0f} s: average accuracy "
                  f"zero-shot {avg['zeroshot']:.1f}%, experts {avg['finetuned']:.1f}%, "
                  f"Task Arithmetic (0.3) {avg['task_arithmetic_0.3']:.1f}%")
    return folder


def _build_in_pinned_child(checkpoint_dir: str, data_location: str, micro: bool, progress: bool,
                           recipe: dict) -> None:
    # The pinned variables take effect only before torch computes, and this process has computed.
    package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = cpu_paths.pinned_environment()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH", "")) if p)
    request = json.dumps({"checkpoint_dir": os.fspath(checkpoint_dir),
                          "data_location": os.fspath(data_location), "micro": micro,
                          "progress": progress, "recipe": recipe})
    if progress:
        print("Building in a child process with the pinned CPU code paths (" +
              " ".join(f"{k}={v}" for k, v in cpu_paths.PINNED.items()) + ")", flush=True)
    done = subprocess.run([sys.executable, "-m", "taskmerge.embedded.build", request], env=env)
    if done.returncode != 0:
        raise RuntimeError(f"the pinned build of the embedded benchmark in {checkpoint_dir} failed "
                           f"(exit {done.returncode}; its output is above)")


def read_manifest(folder: str) -> dict:
    """The manifest of a built benchmark folder."""
    manifest = _read_json(os.path.join(folder, "manifest.json"))
    if manifest is None:
        raise FileNotFoundError(f"{folder}/manifest.json missing or unreadable: the benchmark is not "
                                f"(completely) built; run src/build_embedded_benchmark.py")
    return manifest


def summary(manifest: dict) -> str:
    """The manifest's accuracy table (one row per task) and build time, for printing."""
    acc = manifest["accuracy"]
    cols = ["zeroshot", "finetuned", "task_arithmetic_0.3"]
    lines = [f"{'task':<14}" + "".join(f"{c:>22}" for c in cols)]
    for name in manifest["tasks"] + ["average"]:
        lines.append(f"{name:<14}" + "".join(f"{100 * acc[c][name]:>21.1f}%" for c in cols))
    env = manifest["environment"]
    lines.append(f"build: {manifest['build_seconds'].get('total', 0):.0f} s "
                 f"({env['threads']} threads, {env.get('cpu_paths', 'native')} CPU paths)")
    lines += [f"sha256 {digest}  {name}" for name, digest in manifest.get("sha256", {}).items()]
    return "\n".join(lines)


if __name__ == "__main__":  # the pinned child of _build_in_pinned_child
    ensure_embedded_benchmark(**json.loads(sys.argv[1]))
