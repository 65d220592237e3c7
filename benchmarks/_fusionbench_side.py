"""FusionBench's side of the parity benchmark, run with FusionBench's own environment's python
(benchmarks/fusionbench_env.sh): its algorithm classes on a `CLIPVisionModelPool` of the fixture's
folders, its `CLIPVisionModelTaskPool` pieces for the zero-shot heads and accuracies. Hydra is
bypassed: each class is instantiated with its config/method/*.yaml values (listed in METHODS below).

  names: {our task: FusionBench's class names} (fusion_bench/tasks/clip_classification), so the
         fixture's datasets carry them as their ClassLabel names, as the hub's copies do.
  label: relabels the fixture's test sets with each expert's predictions (its own pipeline).
  run:   per method `<out>/<method>.safetensors` (the merged CLIPVisionModel state dict; EMR: one file
         per task, `EMR__<task>`), `<out>/<method>.f64.safetensors` for the SVD methods and
         RegMean(++) run on float64 models (the reference FusionBench's float32 is measured
         against), `<out>/heads.safetensors`
         (each task's normalised zero-shot weights), `<out>/pixels.safetensors` (the preprocessed
         test images) and `<out>/accuracy.json`.

Fisher, RegMean and RegMean++ (`--train-examples N`) take their statistics from the fixture's train
splits (`CLIPVisionModelPool(train_datasets=…)`, each a parquet file read with `datasets`), with the
yaml's values except `num_*_examples = N`: with N ≤ the batch size (32) every image is in one batch,
so FusionBench's Fisher (the first N, in order) and RegMean (a shuffled, unseeded N) see the same
set as ours (a seeded permutation of the N). The CLIP mixin's zero-shot heads are cached by joblib
under `<out>/joblib_cache` (FusionBench's default, `outputs/cache` of the working directory, would be
inside the repository and outlive the fixture).

The one change to FusionBench's code: DARE's masks are injected (`--dare-masks ours`) from
taskmerge's seeded masks (merging/dare.py keep_mask), since FusionBench draws them from torch's
unseeded global generator; its arithmetic around the mask (`param * mask / (1 − p)`) is its own.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "src"))

import fusion_bench  # noqa: E402,F401
from fusion_bench.method import (DareSimpleAverage, DareTaskArithmetic, DareTiesMerging,  # noqa: E402
                                 IsotropicMergingInCommonAndTaskSubspace,
                                 IsotropicMergingInCommonSubspace, SimpleAverageAlgorithm,
                                 TaskArithmeticAlgorithm, TaskSingularVectorMerging,
                                 TiesMergingAlgorithm, WUDIMerging, FisherMergingForCLIPVisionModel,
                                 RegMeanAlgorithmForCLIP, RegMeanAlgorithmForCLIPPlusPlus,
                                 RegMeanAlgorithmPlusPlus)
from fusion_bench.method.emr_merging import EMRMerging  # noqa: E402 (not exported by method/)
from fusion_bench.models.hf_clip import HFCLIPClassifier  # noqa: E402
from fusion_bench.modelpool import CLIPVisionModelPool  # noqa: E402
from fusion_bench.taskpool import CLIPVisionModelTaskPool  # noqa: E402
from fusion_bench.tasks.clip_classification import get_classnames_and_templates  # noqa: E402
from bidict import bidict  # noqa: E402 (FusionBench's dependency)
from safetensors.torch import save_file  # noqa: E402
from transformers import CLIPVisionModel  # noqa: E402

# FusionBench's hyperparameters (fusion_bench_config/method/<file>.yaml of fusion-bench 0.2.33).
METHODS = {
    "WA": lambda: SimpleAverageAlgorithm(),                                      # simple_average
    "TA": lambda: TaskArithmeticAlgorithm(scaling_factor=0.3),                   # task_arithmetic
    "TIES": lambda: TiesMergingAlgorithm(scaling_factor=0.3, threshold=20,       # ties_merging
                                         remove_keys=[], merge_func="sum"),
    "DARE-WA": lambda: DareSimpleAverage(sparsity_ratio=0.5,                     # dare/simple_average
                                         only_on_linear_weights=False, rescale=True),
    "DARE-TA": lambda: DareTaskArithmetic(scaling_factor=0.3, sparsity_ratio=0.5,  # dare/task_arithmetic
                                          only_on_linear_weights=False, rescale=True),
    "DARE-TIES": lambda: DareTiesMerging(sparsity_ratio=0.5, only_on_linear_weights=False,  # dare/ties_merging
                                         rescale=True, scaling_factor=0.5, threshold=20,
                                         remove_keys=[], merge_func="sum"),
    "TSV-M": lambda: TaskSingularVectorMerging(alpha=1, exclude_keys=None),     # task_singular_vector
    "EMR": lambda: EMRMerging(),                                                 # emr_merging
    "Iso-C": lambda: IsotropicMergingInCommonSubspace(scaling_factor=1.0),       # isotropic_merging/iso_c
    "Iso-CTS": lambda: IsotropicMergingInCommonAndTaskSubspace(                  # isotropic_merging/iso_cts
        scaling_factor=1.0, common_space_fraction=0.8),
    "WUDI": lambda: WUDIMerging(iter_num=400),                                   # wudi/wudi
}


class RegMeanPlusPlusForCLIP(RegMeanAlgorithmForCLIPPlusPlus):
    """FusionBench's class as it is, but constructible: in 0.2.33 its `_config_mapping` is a plain
    dict (regmean_plusplus/clip_regmean_plusplus.py L25-27) that hides the parent's bidict, and the
    parent's @auto_register_config __init__ looks up `_config_mapping.inverse`, so constructing it
    fails ("'dict' object has no attribute 'inverse'"). The parent's mapping plus the dataloader's."""
    _config_mapping = bidict({**RegMeanAlgorithmPlusPlus._config_mapping,
                              "_dataloader_kwargs": "dataloader_kwargs"})


# The data-aware ones, with the number of training examples per task (the yaml's 256) as argument.
DATA_METHODS = {
    "Fisher": lambda n: FisherMergingForCLIPVisionModel(              # fisher_merging/clip_fisher_merging
        exclude_param_names_regex=[], normalize_fisher_weight=True, minimal_fisher_weight=1e-6,
        num_fisher_examples=n, dataloader_kwargs={"batch_size": 32, "num_workers": 0}),
    "RegMean": lambda n: RegMeanAlgorithmForCLIP(                      # regmean/clip_regmean
        exclude_param_names_regex=[], num_regmean_examples=n, weight_transpose=True,
        reduce_non_diagonal_ratio=0.95, dataloader_kwargs={"batch_size": 32, "num_workers": 0}),
    "RegMean++": lambda n: RegMeanPlusPlusForCLIP(                     # regmean_plusplus/clip_regmean_plusplus
        exclude_param_names_regex=[], num_regmean_examples=n, weight_transpose=True,
        reduce_non_diagonal_ratio=0.95, dataloader_kwargs={"batch_size": 32, "num_workers": 0}),
}
DATA_BATCH = 32
JOBLIB_CACHE = [os.path.join(os.getcwd(), "outputs", "cache")]  # FusionBench's default; `run` sets <out>/…
SVD_METHODS = ("TSV-M", "Iso-C", "Iso-CTS")
# run again on float64 models: the reference FusionBench's float32 is measured against (the SVDs;
# RegMean's float32 torch.inverse of Σ G̃, where ours solves in float64)
FLOAT64_METHODS = SVD_METHODS + ("RegMean", "RegMean++")


def log(msg: str) -> None:
    print(f"[fusionbench] {msg}", flush=True)


def folders(root: str, tasks: dict[str, str]) -> tuple[str, dict[str, str]]:
    from fusionbench_fixtures import expert_folder, pretrained_folder
    return pretrained_folder(root), {fb: expert_folder(root, ours) for ours, fb in tasks.items()}


def modelpool(root: str, tasks: dict[str, str], float64: bool = False,
              train: bool = False) -> CLIPVisionModelPool:
    """The pool FusionBench's clip-vit-base-patch32_TA8 config builds, on the fixture's folders; the
    float64 reference gets already-loaded float64 modules instead of paths. `train`: with each
    task's train split (its parquet file, as `datasets.load_dataset` configs, the form the pool
    instantiates), for the data-aware methods; their float64 models are `from_pretrained` configs
    with `torch_dtype` (the pool instantiates each when the algorithm asks; float64_heads gives the
    zero-shot heads)."""
    from omegaconf import DictConfig
    from fusionbench_fixtures import dataset_file
    base, experts = folders(root, tasks)
    models = {"_pretrained_": base, **experts}
    if not train:
        if float64:
            models = {k: CLIPVisionModel.from_pretrained(v).double() for k, v in models.items()}
        return CLIPVisionModelPool(models, processor=base)
    if float64:
        models = DictConfig({k: {"_target_": "transformers.CLIPVisionModel.from_pretrained",
                                 "pretrained_model_name_or_path": v, "torch_dtype": "float64"}
                             for k, v in models.items()})
    train_datasets = DictConfig({fb: {"_target_": "datasets.load_dataset", "path": "parquet",
                                      "data_files": dataset_file(root, ours, "train"),  # → split "train"
                                      "split": "train"} for ours, fb in tasks.items()})
    return CLIPVisionModelPool(models, processor=base, train_datasets=train_datasets)


class InjectedDareMasks:
    """FusionBench's `module_random_drop_` with taskmerge's seeded mask in place of
    `torch.rand_like(param) > p` (fusion_bench/method/dare/utils.py); task t is the t-th call of a
    run, FusionBench's loop order (modelpool.model_names, our task order)."""

    def __init__(self, config: dict, seed: int = 0):
        from fusionbench_keys import flat_span
        from taskmerge.merging.dare import keep_mask
        self.config, self.seed, self.calls = config, seed, 0
        self.flat_span, self.keep_mask = flat_span, keep_mask

    def __call__(self, tv, sparsity_level: float, rescale: bool):
        task = self.calls
        self.calls += 1
        params = tv.named_parameters() if isinstance(tv, torch.nn.Module) else tv.items()
        for name, param in params:
            key, start, stop = self.flat_span(self.config, name, tuple(param.shape))
            mask = self.keep_mask(self.seed, task, key, start, stop, sparsity_level).reshape(param.shape)
            param.data = param.data * mask
            if rescale:
                param.data = param.data / (1 - sparsity_level)


def state_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}


def float64_heads(algorithm, pool: CLIPVisionModelPool) -> None:
    """RegMean's float64 reference: the zero-shot heads built as in float32 (transformers 4.x's CLIP
    text tower cannot run in float64: its causal mask overflows) and cast, so that the logits RegMean
    computes (and discards: its Grams are the linear maps' inputs) take float64 features."""
    from transformers import CLIPModel
    algorithm.modelpool = pool
    algorithm.setup_zero_shot_classification_head(clip_model=CLIPModel.from_pretrained(pool._processor))
    algorithm.visual_projection.double()
    algorithm.logit_scale_exp = algorithm.logit_scale_exp.double()
    algorithm.zeroshot_weights = {t: w.double() for t, w in algorithm.zeroshot_weights.items()}
    algorithm.on_regmean_start = lambda: None


def run_method(name: str, root: str, tasks: dict[str, str], float64: bool, dare_masks,
               train_examples: int = 0) -> dict:
    """{task or "": merged CLIPVisionModel} of one FusionBench algorithm."""
    if dare_masks is not None:
        from fusion_bench.method.dare import task_arithmetic as dare_ta, ties_merging as dare_ties
        dare_masks.calls = 0
        dare_ta.module_random_drop_ = dare_ties.module_random_drop_ = dare_masks
    if name in DATA_METHODS:
        if not 1 <= train_examples <= DATA_BATCH:
            raise SystemExit(f"{name}: --train-examples must be 1..{DATA_BATCH} (one batch: the same "
                             f"examples and batches as ours), got {train_examples}")
        from fusion_bench.utils import cache_utils
        # its zero-shot heads cached apart per dtype (joblib keys them on the task and model path only)
        cache_utils.set_default_cache_dir(os.path.join(JOBLIB_CACHE[0], "float64" if float64 else "float32"))
        algorithm = DATA_METHODS[name](train_examples)
        algorithm.zeroshot_weights = {}  # its own: the mixin's class-level dict is shared by every instance
        pool = modelpool(root, tasks, float64, train=True)
        if float64:
            float64_heads(algorithm, pool)
        return {"": algorithm.run(pool)}
    pool = modelpool(root, tasks, float64)
    result = METHODS[name]().run(pool)
    if name != "EMR":
        return {"": result}
    models = {}
    for fb_task in pool.model_names:  # EMRTaskModulator.apply / remove: θ0 + τ_uni ⊙ mask_t · rescaler_t
        modulator = result.modulators[fb_task]
        modulator.apply(result)
        models[fb_task] = copy.deepcopy(result.backbone)
        modulator.remove(result)
    return models


def main_names(args) -> None:
    tasks = json.loads(args.tasks_json)
    names = {ours: list(get_classnames_and_templates(fb)[0]) for ours, fb in tasks.items()}
    with open(args.out, "w") as f:
        json.dump(names, f, ensure_ascii=False, indent=1)


def task_pool(root: str, tasks: dict[str, str], batch_size: int):
    """FusionBench's CLIPVisionModelTaskPool over the fixture's parquet test sets, set up."""
    from datasets import load_dataset
    from fusionbench_fixtures import dataset_file
    base, _ = folders(root, tasks)
    datasets = {fb: load_dataset("parquet", data_files={"test": dataset_file(root, ours)}, split="test")
                for ours, fb in tasks.items()}
    taskpool = CLIPVisionModelTaskPool(datasets, processor=base, clip_model=base,
                                       dataloader_kwargs={"batch_size": batch_size, "num_workers": 0,
                                                          "shuffle": False})
    taskpool.setup()
    return taskpool, datasets


@torch.no_grad()
def main_label(args) -> None:
    """Relabel each test set with its expert's predictions under FusionBench's pipeline, so that
    the accuracies measure agreement with the experts instead of chance (FusionBench's Individual
    row is then 100 % by construction)."""
    from datasets import ClassLabel
    from fusionbench_fixtures import dataset_file
    tasks = json.loads(args.tasks_json)
    taskpool, datasets = task_pool(args.root, tasks, args.batch_size)
    _, experts = folders(args.root, tasks)
    for ours, fb in tasks.items():
        taskpool.clip_model.vision_model = CLIPVisionModel.from_pretrained(experts[fb])
        classifier = HFCLIPClassifier(taskpool.clip_model, processor=taskpool.processor)
        classnames, templates = get_classnames_and_templates(fb)
        classifier.set_classification_task(classnames, templates)
        predicted = torch.cat([classifier(images).argmax(-1) for images, _ in taskpool.test_dataloaders[fb]])
        data = datasets[fb]
        feature = data.features["label"]
        data = data.remove_columns("label").add_column("label", predicted.tolist())
        data = data.cast_column("label", ClassLabel(names=feature.names))
        data.to_parquet(dataset_file(args.root, ours))
        log(f"{ours}: labels = the expert's predictions ({len(set(predicted.tolist()))} classes occur)")


def main_run(args) -> None:
    from taskmerge.storage.hf_checkpoints import read_hf_checkpoint
    tasks = json.loads(args.tasks_json)
    os.makedirs(args.out, exist_ok=True)
    JOBLIB_CACHE[:] = [os.path.join(args.out, "joblib_cache")]
    base, experts = folders(args.root, tasks)
    config = read_hf_checkpoint(base).config
    # The task pool's own pieces (taskpool/clip_vision/taskpool.py evaluate): its CLIPDataset over
    # the processor, its HFCLIPClassifier heads, its _evaluate loop, one task at a time so that EMR's
    # task-specific models are each evaluated on their own task.
    taskpool, _ = task_pool(args.root, tasks, args.batch_size)
    # the pixels FusionBench's CLIPDataset feeds the model (its processor's resize, crop, normalise)
    save_file({ours: torch.stack([taskpool.test_datasets[fb][i][0] for i in range(len(taskpool.test_datasets[fb]))])
               for ours, fb in tasks.items()}, os.path.join(args.out, "pixels.safetensors"))
    heads, accuracy = {}, {}

    def evaluate(models: dict, label: str) -> dict[str, float]:
        accs = {}
        for ours, fb in tasks.items():
            taskpool.clip_model.vision_model = models[fb] if fb in models else models[""]
            classifier = HFCLIPClassifier(taskpool.clip_model, processor=taskpool.processor)
            classnames, templates = get_classnames_and_templates(fb)
            if ours in heads:  # the text tower is fixed: the task's zero-shot weights are too
                classifier.classnames, classifier.templates = classnames, templates
                classifier.zeroshot_weights = heads[ours]
            else:
                classifier.set_classification_task(classnames, templates)
                heads[ours] = classifier.zeroshot_weights.detach().cpu().contiguous().clone()
            accs[ours] = taskpool._evaluate(classifier, taskpool.test_dataloaders[fb],
                                            num_classes=len(classnames), task_name=fb)["accuracy"]
        log(f"{label}: " + ", ".join(f"{t} {a:.4f}" for t, a in accs.items()))
        return accs

    experts_loaded = {fb: CLIPVisionModel.from_pretrained(p) for fb, p in experts.items()}
    accuracy["Individual"] = evaluate(experts_loaded, "Individual")
    del experts_loaded
    save_file(heads, os.path.join(args.out, "heads.safetensors"))
    with open(os.path.join(args.out, "heads_meta.json"), "w") as f:
        json.dump({"logit_scale": float(taskpool.clip_model.logit_scale.exp())}, f)
    dare_masks = InjectedDareMasks(config) if args.dare_masks == "ours" else None
    timings = {}
    for name in args.methods.split(","):
        start = time.time()
        uses_dare = name.startswith("DARE")
        models = run_method(name, args.root, tasks, False, dare_masks if uses_dare else None,
                            args.train_examples)
        timings[name] = round(time.time() - start, 2)
        for fb, model in models.items():
            suffix = f"__{next(o for o, f in tasks.items() if f == fb)}" if fb else ""
            save_file(state_of(model), os.path.join(args.out, f"{name}{suffix}.safetensors"))
        accuracy[name] = evaluate(models, name)
        if name in FLOAT64_METHODS and args.float64_reference:
            ref = run_method(name, args.root, tasks, True, None, args.train_examples)[""]
            save_file(state_of(ref), os.path.join(args.out, f"{name}.f64.safetensors"))
        log(f"{name}: merged in {timings[name]} s")
    with open(os.path.join(args.out, "accuracy.json"), "w") as f:
        json.dump({"accuracy": accuracy, "merge_seconds": timings,
                   "versions": versions()}, f, indent=1)


def versions() -> dict:
    import importlib.metadata as md
    return {p: md.version(p) for p in ("fusion-bench", "torch", "transformers", "datasets")}


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="command", required=True)
    names = sub.add_parser("names")
    names.add_argument("--tasks-json", required=True, help='{"Cars": "stanford-cars", ...}')
    names.add_argument("--out", required=True)
    label = sub.add_parser("label")
    label.add_argument("--root", required=True)
    label.add_argument("--tasks-json", required=True)
    label.add_argument("--batch-size", type=int, default=32)
    run = sub.add_parser("run")
    run.add_argument("--root", required=True)
    run.add_argument("--tasks-json", required=True)
    run.add_argument("--methods", required=True)
    run.add_argument("--out", required=True)
    run.add_argument("--batch-size", type=int, default=32)
    run.add_argument("--dare-masks", choices=["ours", "fusionbench"], default="ours")
    run.add_argument("--float64-reference", action=argparse.BooleanOptionalAction, default=True)
    run.add_argument("--train-examples", type=int, default=0,
                     help="Fisher / RegMean / RegMean++: training examples per task (≤ 32)")
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    {"names": main_names, "label": main_label, "run": main_run}[args.command](args)
