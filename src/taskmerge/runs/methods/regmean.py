"""RegMean (Jin et al., ICLR 2023) and RegMean++ (Nguyen et al. 2025), FusionBench's CLIP recipe:
the Grams of every linear map's inputs on a sample of each task's training images, then the
closed-form least-squares merge (merging/regmean.py); RegMean++ takes each block's inputs through
the blocks already merged (adaptive/statistics.regmean_plusplus)."""
from __future__ import annotations

from dataclasses import dataclass

from taskmerge.adaptive.statistics import POST_LAYERS, gram_matrices, linear_maps, regmean_plusplus
from taskmerge.adaptive.statistics import num_blocks
from taskmerge.merging.regmean import RegMeanAccumulator
from taskmerge.runs.data_free import Merge, Run
from taskmerge.runs.identity import checkpoint_digests
from taskmerge.runs.registry import Method, declare
from taskmerge.runs.reporting import num
from taskmerge.runs.script_configs import merge_config, surgery_config
from taskmerge.runs.settings import setting
from taskmerge.runs.setup import fresh_encoder
from taskmerge.runs.train_statistics import (expert_statistics, keys_digest, megabytes, merged_key_set,
                                             model_bytes, SampledImages, sample_images, sample_split,
                                             statistics_cache)
from taskmerge.merging.task_vectors import shape_of

METHODS = ("regmean", "regmean_plusplus")


@dataclass
class RegMeanMerge:
    method: str = setting(choices=METHODS)
    num_regmean_examples: int = setting(ge=1)
    regmean_batch_size: int = setting(ge=1)
    reduce_non_diagonal_ratio: float = setting(ge=0.0, le=1.0)
    regmean_ridge: float = setting(ge=0.0, finite=True)
    plusplus_post: str = setting(choices=POST_LAYERS)    # RegMean++ only
    sample_seed: int = setting(ge=0)


def _gram_bytes(run, maps) -> int:
    pretrained, _ = run.experts()
    sizes = {}
    for m in maps:
        shape = shape_of(pretrained, m.weight)
        sizes[m.gram] = shape[0] if m.transposed else shape[-1]
    return 4 * sum(d * d for d in sizes.values())


def merge_regmean(run: Run, s: RegMeanMerge) -> Merge:
    pretrained, experts = run.experts()
    keys, key_set = merged_key_set(run)
    maps = linear_maps(keys)
    tasks = run.setup.tasks
    grams, model = _gram_bytes(run, maps), model_bytes(run, keys)
    ridge = f", ridge {s.regmean_ridge}" if s.regmean_ridge else ""
    what = "RegMean++" if s.method == "regmean_plusplus" else "RegMean"
    run.log.info(f"{what}: {s.num_regmean_examples} training images per task (seed {s.sample_seed}), "
                 f"{len(maps)} linear maps (attention in_proj fused: q, k and v share one Gram, which is "
                 f"FusionBench's three identical q/k/v Grams), non-diagonal ratio "
                 f"{s.reduce_non_diagonal_ratio}{ridge}; every other key the experts' mean"
                 + ("; the projection and the text tower are not FusionBench's CLIPVisionModel's and keep θ0"
                    if key_set else ""))
    samples = {t: sample_split(run, t, s.num_regmean_examples, s.sample_seed, "num_regmean_examples")
               for t in tasks}
    extra = {"regmean_method": s.method, "num_regmean_examples": s.num_regmean_examples,
             "reduce_non_diagonal_ratio": s.reduce_non_diagonal_ratio, "regmean_ridge": s.regmean_ridge,
             "regmean_batch_size": s.regmean_batch_size, "sample_seed": s.sample_seed, **key_set}
    if s.method == "regmean":
        run.log.info(f"Memory plan: Σ G̃ over the maps ({megabytes(grams)}) + Σ G̃·Wᵀ and the sums of the "
                     f"other keys ({megabytes(model)}) + one expert's Grams ({megabytes(grams)}) and "
                     f"weights, whatever the number of tasks")
        acc = RegMeanAccumulator(pretrained, maps, keys, ratio=s.reduce_non_diagonal_ratio,
                                 ridge=s.regmean_ridge)
        for task in tasks:
            sample, identity = samples[task]
            key = {"data": identity, "batch_size": s.regmean_batch_size, "maps": keys_digest(
                [m.gram for m in maps])}
            g = expert_statistics(run, "grams", task, key, lambda: gram_matrices(
                fresh_encoder(run.setup, experts[task]), sample_images(run, task, sample), maps,
                batch_size=s.regmean_batch_size, device=run.setup.device, desc=f"Grams {task}"))
            acc.add(experts[task], g)
            del g
        return Merge(f"regmean_r{s.reduce_non_diagonal_ratio}", acc.merged(), extra=extra)

    extra["plusplus_post"] = s.plusplus_post
    width = shape_of(pretrained, "model.visual.positional_embedding")
    held = sum(len(samples[t][0]) for t in tasks) * width[0] * width[1] * 4   # float32 tokens
    blocks = max(num_blocks(keys), 1)
    run.log.info(f"Memory plan: every task's block inputs ({megabytes(held)}, on the CPU) + one block's "
                 f"Σ G̃ ({megabytes(grams / blocks)}) + the merged model ({megabytes(model)})")
    cache = statistics_cache(run, "regmean_plusplus")
    key = {"model": run.setup.model_name, "checkpoints": checkpoint_digests(run.setup.checkpoints),
           "tasks": list(tasks), "data": {t: samples[t][1] for t in tasks},
           "settings": {k: v for k, v in extra.items() if k != "key_set"}, "keys": keys_digest(keys)}
    merged = cache.load(key)
    if merged is not None:
        run.log.info(f"RegMean++: the merged model read from {cache.path_for(key)}")
    else:
        merged = regmean_plusplus(fresh_encoder(run.setup), pretrained, experts,
                                  SampledImages(run, {t: samples[t][0] for t in tasks}), keys,
                                  ratio=s.reduce_non_diagonal_ratio, ridge=s.regmean_ridge,
                                  post=s.plusplus_post, batch_size=s.regmean_batch_size,
                                  device=run.setup.device, log=run.log.info)
        cache.store(key, merged)
    return Merge(f"regmean_plusplus_r{s.reduce_non_diagonal_ratio}", merged, extra=extra)


def label(report: dict) -> str:
    ridge = f", ridge {num(report['regmean_ridge'])}" if report.get("regmean_ridge") else ""
    post = ", post layers merged" if report.get("plusplus_post") == "merged" else ""
    return (f"{report.get('regmean_method', 'regmean')} (ratio {num(report.get('reduce_non_diagonal_ratio'))}, "
            f"{num(report.get('num_regmean_examples'))} examples per task{ridge}{post})")


METHOD = declare(Method("regmean", RegMeanMerge, merge_regmean, label, script="main_RegMean.py",
                        bases={"regmean": {"method": "regmean"},
                               "regmean_plusplus": {"method": "regmean_plusplus"}},
                        coefficient_keys=("reduce_non_diagonal_ratio", "regmean_ridge")))
RegMeanConfig = merge_config(METHOD)
RegMeanSurgeryConfig = surgery_config(METHOD)
