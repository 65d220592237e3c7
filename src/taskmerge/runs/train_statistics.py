"""What the data-aware merges (Fisher merging, RegMean, RegMean++) share: each task's seeded sample
of training images, the on-disk cache of each expert's statistics, the key set they merge, and the
log line of their memory plan.

Every task's sample is drawn (and a missing or short split refused) before any work; its images are
read one task at a time. The sample is `torch.randperm(|train|, generator seeded sample_seed)[:n]` of the task's training
split (the full one: the split the experts were fine-tuned on; FusionBench reads the train split
too, its Fisher the first n in order, its RegMean a shuffled, unseeded n). The seed, the count and
the data's identity are in every cache key, with the expert's file digest and the settings, so a
second run, or a Surgery run on the same base, reads the statistics back instead of recomputing them.
"""
from __future__ import annotations

import os
from typing import Callable, Mapping, Sequence

import torch
from torch.utils.data import Subset

from taskmerge.adaptive.adaptation_data import TaskImages
from taskmerge.adaptive.feature_cache import FeatureCache
from taskmerge.datasets.errors import DatasetLayoutError
from taskmerge.merging.task_vectors import merged_keys, numel_of
from taskmerge.runs.identity import data_identity, short_hash
from taskmerge.runs.setup import task_data
from taskmerge.storage.checkpoints import file_digest
from taskmerge.storage.hf_checkpoints import vision_model_keys


def sample_split(run, task: str, n: int, seed: int, setting: str) -> tuple[Subset, dict]:
    """(the n sampled training items of `task`, their identity for cache keys), without reading an
    image; `setting` names the count's setting in the error of a split that is missing or too small."""
    data = task_data(run.setup, task)
    where = data.info.get("root", run.setup.data_location)
    if data.train is None:
        raise DatasetLayoutError(f"{task}: no training split under {where}; {setting} needs {n} training "
                                 f"images of every task: add the task's train split (README 'Data')")
    if len(data.train) < n:
        raise DatasetLayoutError(f"{task}: the training split under {where} has {len(data.train)} images, "
                                 f"fewer than {setting}={n}: lower {setting}, or complete the split")
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    identity = {**data_identity(task, "train", run.setup.data_location, data.train),
                "sample": {"n": n, "seed": seed}}
    return Subset(data.train, order), identity


def sample_images(run, task: str, sample: Subset) -> TaskImages:
    """The sample's images, read now (as tensors when they fit, else per batch by the loader)."""
    loader = run.setup.loader
    return TaskImages(sample, name=f"{task} train sample", num_workers=loader.num_workers,
                      pin_memory=loader.pin_memory)


class SampledImages(Mapping):
    """{task: TaskImages}, each task's sample read when it is asked for and not kept: one task's
    images in memory at a time, whatever the number of tasks."""

    def __init__(self, run, samples: Mapping[str, Subset]):
        self.run, self.samples = run, dict(samples)

    def __getitem__(self, task: str) -> TaskImages:
        return sample_images(self.run, task, self.samples[task])

    def __iter__(self):
        return iter(self.samples)

    def __len__(self) -> int:
        return len(self.samples)


def statistics_cache(run, kind: str) -> FeatureCache:
    return FeatureCache(os.path.join(run.setup.cache_dir, "statistics"), run.log.info, kind=kind)


def expert_statistics(run, kind: str, task: str, key: dict, compute: Callable[[], dict]) -> dict:
    """One expert's statistics from the cache, or computed now (and cached by rank 0)."""
    cache = statistics_cache(run, kind)
    full = {"kind": kind, "model": run.setup.model_name, "task": task,
            "checkpoint": file_digest(run.setup.checkpoints.finetuned_path(task)), **key}
    found = cache.load(full)
    if found is not None:
        run.log.info(f"{task}: {kind} read from {cache.path_for(full)}")
        return found
    out = compute()
    cache.store(full, out)
    return out


def merged_key_set(run) -> tuple[list[str], dict]:
    """(the keys merged, the report's field): on the fusionbench family the CLIPVisionModel's
    entries FusionBench merges (its visual_projection and the text tower are not in the model it
    merges), the other keys keep θ0; elsewhere every floating-point key."""
    pretrained, _ = run.experts()
    keys = vision_model_keys(pretrained) if run.setup.family == "fusionbench" else None
    if keys is None:
        return merged_keys(pretrained), {}
    return keys, {"key_set": "vision_model"}


def keys_digest(keys: Sequence[str]) -> str:
    return short_hash(list(keys))


def megabytes(n_bytes: float) -> str:
    return f"{n_bytes / 2**20:,.1f} MiB"


def model_bytes(run, keys: Sequence[str]) -> int:
    pretrained, _ = run.experts()
    return 4 * sum(numel_of(pretrained, k) for k in keys)
