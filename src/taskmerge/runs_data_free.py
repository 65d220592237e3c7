"""One function per data-free entry script: resolve the setup, merge, choose a coefficient on
validation where the method's family does, evaluate every task, log and report.

The merge math itself lives in `merging/`; this file only wires it to checkpoints, data and logs.
"""
from __future__ import annotations

import os
from typing import Callable, Mapping

import torch

from . import merging
from .experiment import (Setup, evaluate_tasks, finish_run, individual_accuracies, load_heads,
                         resolve_setup, start_run)
from .merging.task_arithmetic import LAM_GRID_TALL, LAM_GRID_TSV
from .reporting import RunLogger
from .selection import select_coefficient, select_per_task
from .task_vectors import apply

VAL_GRIDS = {"tall_masks": LAM_GRID_TALL, "tsv": LAM_GRID_TSV, "tsv_alpha": merging.TSV_ALPHA_GRID}


class Run:
    """The state one data-free run carries between its steps."""

    def __init__(self, config: dict, script: str, method: str, subfolder: str = "merging"):
        self.config = config
        self.method = method
        self.setup: Setup = resolve_setup(config["model_name"], config["checkpoint_dir"],
                                          config["data_location"], config.get("tasks") or None)
        self.log: RunLogger = start_run(config, self.setup, script, method, subfolder,
                                        config.get("log_dir", "src/logs"))
        self.batch_size = config.get("batch_size", 128)
        self.heads = load_heads(self.setup)
        self.individual = individual_accuracies(self.setup, self.heads, self.batch_size)
        self._individual_val = None

    def experts(self):
        """θ0 and {task: θ_t} as lazy readers, validated before any merge work."""
        ckpt = self.setup.checkpoints
        ckpt.validate()
        return ckpt.pretrained(), {t: ckpt.finetuned(t) for t in self.setup.tasks}

    def evaluate(self, state_dict, split: str = "test", per_task: bool = False) -> dict[str, float]:
        return evaluate_tasks(self.setup, state_dict, self.heads, self.batch_size, split, per_task)

    @property
    def individual_val(self) -> dict[str, float]:
        if self._individual_val is None:
            self._individual_val = individual_accuracies(self.setup, self.heads, self.batch_size, "val")
        return self._individual_val

    def select(self, grid, merged_at: Callable[[float], Mapping[str, torch.Tensor]]) -> tuple[float, dict]:
        self.log.info(f"Choosing the coefficient on the <Task>Val splits over {list(grid)}")
        best, curve = select_coefficient(grid, merged_at, lambda sd: self.evaluate(sd, "val"),
                                         self.individual_val, self.log.info)
        self.log.info(f"Chosen coefficient: {best}")
        return best, {str(k): v for k, v in curve.items()}

    def save_merged(self, obj, name: str) -> str | None:
        """Save the merged model (or compact per-task representation) as safetensors."""
        save_dir = self.config.get("save_dir")
        if not save_dir:
            return None
        path = os.path.join(save_dir, self.setup.model_name, f"{name}.safetensors")
        if hasattr(obj, "save"):
            obj.save(path)
        else:
            from .atomic import save_safetensors
            save_safetensors({k: v for k, v in obj.items()}, path,
                             metadata={"method": name, "model": self.setup.model_name})
        self.log.info(f"Saved {path}")
        return path

    def finish(self, accs: dict[str, float], **extra) -> dict:
        return finish_run(self.log, self.setup, self.method, accs, self.individual, **extra)


def run_single_task_eval(config: dict, script: str) -> dict:
    """Zero-shot (θ0) and individual (θ_t on task t) accuracy: the reference rows of every table."""
    run = Run(config, script, "single_task", subfolder="single_task")
    split = config.get("split", "test")
    ckpt = run.setup.checkpoints
    zeroshot = run.evaluate(ckpt.pretrained(), split)
    individual = (run.individual if split == "test" else run.individual_val)
    run.log.eval_step("zeroshot", zeroshot)
    run.log.eval_step("finetuned", individual)
    from .reporting import results_table
    run.log.info(results_table({"Zero-shot": zeroshot, "Individual": individual}, run.setup.tasks))
    return run.log.write_report(method="single_task", model=run.setup.model_name,
                                checkpoint_family=run.setup.family, tasks=run.setup.tasks,
                                split=split, zeroshot_accuracy=zeroshot,
                                individual_accuracy=individual,
                                average_zeroshot=sum(zeroshot.values()) / len(zeroshot),
                                average_individual=sum(individual.values()) / len(individual))


def _scaled(run: Run, config: dict, delta: Mapping[str, torch.Tensor], pretrained,
            coef_key: str, grid_name: str) -> tuple[float, dict | None]:
    """The coefficient: the config's number, or chosen on validation when `select_on_val`."""
    if not config.get("select_on_val"):
        return config[coef_key], None
    grid = VAL_GRIDS[config.get("val_grid", grid_name)]
    return run.select(grid, lambda c: apply(pretrained, delta, c))


def run_weight_averaging(config: dict, script: str) -> dict:
    run = Run(config, script, "weight_averaging")
    pretrained, experts = run.experts()
    merged = merging.weight_averaging(pretrained, experts, drop_last=config["drop_last"],
                                      validate_inputs=False)
    run.save_merged(merged, "weight_averaging")
    accs = run.evaluate(merged)
    run.log.eval_step(0, accs)
    return run.finish(accs, drop_last=config["drop_last"])


def run_task_arithmetic(config: dict, script: str) -> dict:
    run = Run(config, script, "task_arithmetic")
    pretrained, experts = run.experts()
    tau_sum = merging.multitask_vector(pretrained, experts, validate_inputs=False)
    lam, curve = _scaled(run, config, tau_sum, pretrained, "scaling_coef", "tall_masks")
    merged = apply(pretrained, tau_sum, lam)
    run.log.info(f"scaling_coef:{lam}")
    run.save_merged(merged, f"task_arithmetic_{lam}")
    accs = run.evaluate(merged)
    run.log.eval_step(0, accs)
    return run.finish(accs, scaling_coef=lam, val_curve=curve)


def run_ties_merging(config: dict, script: str) -> dict:
    preset = dict(merging.TIES_PRESETS[config["preset"]])
    for key in ("k", "merge", "scaling_coef"):
        if config.get(key) is not None:
            preset["lam" if key == "scaling_coef" else key] = config[key]
    run = Run(config, script, f"ties_merging_{preset['merge']}")
    run.log.info(f"TIES settings: {preset}")
    pretrained, experts = run.experts()
    delta = merging.ties_delta(pretrained, experts, k=preset["k"], merge=preset["merge"],
                               validate_inputs=False)
    if preset["lam"] is None:
        lam, curve = run.select(VAL_GRIDS[config.get("val_grid", "tall_masks")],
                                lambda c: apply(pretrained, delta, c))
    else:
        lam, curve = preset["lam"], None
    merged = apply(pretrained, delta, lam)
    run.save_merged(merged, f"ties_{preset['merge']}_k{preset['k']}_{lam}")
    accs = run.evaluate(merged)
    run.log.eval_step(0, accs)
    return run.finish(accs, ties=preset, scaling_coef=lam, val_curve=curve)


def _per_task_eval(run: Run, obj, pretrained) -> dict[str, float]:
    """Task t evaluated with task t's reconstructed model (the method needs task identity)."""
    run.log.info("Evaluation uses task identity: task t is evaluated with its own reconstructed model.")
    models = _LazyTaskModels(obj, pretrained)
    return run.evaluate(models, per_task=True)


class _LazyTaskModels(Mapping):
    """{task: θ_t} built on demand, so only one reconstructed model is alive at a time."""

    def __init__(self, obj, pretrained):
        self.obj, self.pretrained = obj, pretrained

    def __getitem__(self, task):
        return self.obj.task_state_dict(self.pretrained, task)

    def __iter__(self):
        return iter(self.obj.tasks)

    def __len__(self):
        return len(self.obj.tasks)


def run_emr_merging(config: dict, script: str) -> dict:
    run = Run(config, script, f"emr_merging_{config['rescaler']}")
    pretrained, experts = run.experts()
    emr = merging.emr_merging(pretrained, experts, rescaler=config["rescaler"], validate_inputs=False)
    run.log.info(f"Rescalers ({config['rescaler']}): "
                 + ", ".join(f"{t}: {float(r):.4f}" for t, r in zip(emr.tasks, emr.rescalers)))
    run.save_merged(emr, f"emr_{config['rescaler']}")
    accs = _per_task_eval(run, emr, pretrained)
    run.log.eval_step(0, accs)
    return run.finish(accs, rescaler=config["rescaler"],
                      rescalers=dict(zip(emr.tasks, emr.rescalers.tolist())),
                      storage=emr.storage_report(), task_identity=True)


def run_tsv_merging(config: dict, script: str) -> dict:
    method = config["method"]
    run = Run(config, script, method)
    pretrained, experts = run.experts()
    if method == "TSVC":
        tsvc = merging.tsv_compress(pretrained, experts, validate_inputs=False)
        run.save_merged(tsvc, "TSVC")
        accs = _per_task_eval(run, tsvc, pretrained)
        run.log.eval_step(0, accs)
        return run.finish(accs, alpha=1.0, storage=tsvc.storage_report(), task_identity=True)
    delta = merging.tsv_delta(pretrained, experts, method, validate_inputs=False)
    alpha, curve = _scaled(run, config, delta, pretrained, "alpha", "tsv_alpha")
    merged = apply(pretrained, delta, alpha)
    run.save_merged(merged, f"{method}_{alpha}")
    accs = run.evaluate(merged)
    run.log.eval_step(0, accs)
    return run.finish(accs, alpha=alpha, val_curve=curve)


def run_tall_masks(config: dict, script: str) -> dict:
    method = config["method"]
    use_ties = config["use_ties"]
    run = Run(config, script, method + ("_ties" if use_ties else "_ta"))
    pretrained, experts = run.experts()
    tau_mtl = merging.multitask_vector(pretrained, experts, use_ties, validate_inputs=False)
    tasks = run.setup.tasks
    lams = list(config["tall_lambdas"])

    def task_model(task, lam):
        mask = merging.tall_mask(pretrained, experts[task], tau_mtl, lam)
        return apply(pretrained, {k: v * mask[k] for k, v in tau_mtl.items()}, 1.0)

    def task_val_acc(task, sd):
        from .evaluation import evaluate
        from .experiment import encoder_for, task_data
        return evaluate(encoder_for(run.setup, sd), run.heads[task],
                        task_data(run.setup, task, "val").test, run.batch_size)

    run.log.info(f"Choosing each task's TALL λ on its <Task>Val split over {lams}")
    chosen, lam_curve = select_per_task(lams, tasks, task_model, task_val_acc, run.log.info)
    tall = merging.tall_masks(pretrained, experts, [chosen[t] for t in tasks], tau_mtl=tau_mtl,
                              use_ties=use_ties, validate_inputs=False)
    run.save_merged(tall, f"TALL_mask_{len(tasks)}task" + ("_use_ties" if use_ties else ""))
    extra = {"tall_lambdas": chosen, "tall_val_curve": lam_curve, "use_ties": use_ties,
             "storage": tall.storage_report()}
    if method == "tall_mask":
        accs = _per_task_eval(run, tall, pretrained)
        run.log.eval_step(0, accs)
        return run.finish(accs, task_identity=True, **extra)
    if method != "consensus":
        raise ValueError(f"method={method!r}: expected 'tall_mask' or 'consensus'")
    k = config["prun_thre_k"]
    mask = merging.consensus_mask(tall, k)
    delta = {key: tau * mask[key] for key, tau in tall.tau_mtl.items()}
    kept = sum(int(m.sum()) for m in mask.values()) / max(sum(m.numel() for m in mask.values()), 1)
    run.log.info(f"Consensus k={k}: keeps {100 * kept:.2f}% of the multi-task vector's entries")
    alpha, curve = _scaled(run, config, delta, pretrained, "alpha", "tall_masks")
    merged = apply(pretrained, delta, alpha)
    run.save_merged(merged, f"consensus_k{k}_{alpha}")
    accs = run.evaluate(merged)
    run.log.eval_step(0, accs)
    return run.finish(accs, alpha=alpha, prun_thre_k=k, kept_fraction=kept, val_curve=curve, **extra)
