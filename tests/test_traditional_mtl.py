"""Traditional MTL (adaptive/multitask.py, runs/methods/traditional_mtl.py) on the micro benchmark:
it learns (the loss falls, the accuracy rises above zero-shot), a second run and a Surgery run load
the cached encoder, eval_single_task evaluates the saved file, a killed run resumes bit-identically,
the DataLoader path equals the preloaded one, two gloo ranks equal one process, and a task without
a training split is one clear error."""
import dataclasses
import glob
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from script_variables import SRC, script_config, script_variables
from test_distributed import RANKS, _args, _reports, _torchrun
from test_families_end_to_end import fusionbench_root  # noqa: F401 (a fixture)

import taskmerge.runs.methods.traditional_mtl as mtl_method
from taskmerge.adaptive.adaptation_data import TaskImages
from taskmerge.adaptive.multitask import FUSIONBENCH, experts_recipe, step_indices, train_multitask
from taskmerge.datasets.errors import DatasetLayoutError
from taskmerge.models.encoders import build_image_encoder
from taskmerge.runs.adaptive import run_surgery
from taskmerge.runs.cli import main_on_any_base
from taskmerge.runs.data_free import Run, run_data_free, run_single_task_eval
from taskmerge.runs.reporting import method_label
from taskmerge.storage.errors import ConfigError

SCRIPT = "main_TraditionalMTL.py"
TASKS = ["Digits", "Fashion"]


def _settings(bench, out, **kw) -> dict:
    ckpt, data = bench
    # native CPU paths: the reference runs inside this unpinned process, as test_distributed's
    return {"model_name": "taskmerge-tiny-micro", "checkpoint_dir": ckpt, "data_location": data,
            "device": "cpu", "log_dir": str(out / "logs"), "cache_dir": str(out / "cache"),
            "save_dir": "", "resume_dir": "", "cpu_paths": "native", "tasks": TASKS, **kw}


def loaded_pretrained(settings) -> dict:
    path = os.path.join(settings["checkpoint_dir"], "taskmerge-tiny-micro", "zeroshot.pt")
    return torch.load(path, weights_only=True)


def _log_text(report, out) -> str:
    path, = glob.glob(str(out / "logs" / "**" / report["log"]), recursive=True)
    return open(path).read()


@pytest.fixture(scope="module")
def learned(micro_benchmark, tmp_path_factory):
    """200 steps of the experts' recipe (lr 1e-3) on two micro tasks, saved: (report, out folder)."""
    out = tmp_path_factory.mktemp("mtl_learned")
    settings = _settings(micro_benchmark, out, mtl_lr=1e-3, mtl_steps=200, save_dir=str(out / "merged"))
    return run_data_free(script_config(SCRIPT, **settings), script=SCRIPT), out, settings


@pytest.fixture(scope="module")
def small(micro_benchmark, tmp_path_factory):
    """4 steps of 8 images per task: (report, out folder, settings)."""
    out = tmp_path_factory.mktemp("mtl_small")
    settings = _settings(micro_benchmark, out, mtl_steps=4, mtl_batch_size=8)
    return run_data_free(script_config(SCRIPT, **settings), script=SCRIPT), out, settings


def test_the_loss_falls_and_the_saved_model_beats_zero_shot(learned, micro_benchmark):
    report, out, settings = learned
    losses = report["mtl_history"]
    assert len(losses) == 200 and report["mtl_source"] == "trained"
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20 - 0.1
    # the run's recipe: the micro build's experts' recipe, with the lr and steps set here
    assert report["mtl"] == {"recipe": "experts", "steps": 200, "batch_size": 32, "lr": 1e-3,
                             "weight_decay": 0.1, "optimizer": "adamw", "warmup": 4, "grad_clip": 1.0,
                             "crop_scale": [0.9, 1.0], "train_projection": True, "seed": 0}
    assert method_label(report) == "Traditional MTL (experts' recipe, 200 steps)"
    # the saved file is evaluated like an expert by eval_single_task.py, to the same accuracies
    saved, = glob.glob(str(out / "merged" / "**" / "*.safetensors"), recursive=True)
    single = run_single_task_eval(script_config(
        "eval_single_task.py", **{k: v for k, v in settings.items()
                                  if k in script_variables("eval_single_task.py")},
        split="test", model_file=saved), script="eval_single_task.py")
    assert single["model_accuracy"] == report["accuracy"]
    assert single["model_method"].startswith("traditional_mtl_experts_200")
    assert single["average_model_accuracy"] > single["average_zeroshot"]


def test_a_second_run_loads_the_cached_encoder(learned):
    report, out, settings = learned
    again = run_data_free(script_config(SCRIPT, **{**settings, "save_dir": ""}), script=SCRIPT)
    assert again["mtl_source"] == "cache" and again["mtl_file"] == report["mtl_file"]
    assert again["accuracy"] == report["accuracy"] and again["mtl_history"] == report["mtl_history"]
    assert "loaded the trained encoder" in _log_text(again, out)
    # another seed is another encoder: trained, never taken from this cache
    other = run_data_free(script_config(SCRIPT, **{**settings, "save_dir": "", "mtl_steps": 2, "seed": 1}),
                          script=SCRIPT)
    assert other["mtl_source"] == "trained" and other["mtl_file"] != report["mtl_file"]


def test_an_unreadable_cached_encoder_is_trained_again_and_replaced(micro_benchmark, tmp_path):
    settings = _settings(micro_benchmark, tmp_path, mtl_steps=2, mtl_batch_size=4)
    first = run_data_free(script_config(SCRIPT, **settings), script=SCRIPT)
    with open(first["mtl_file"], "r+b") as f:
        f.truncate(100)
    again = run_data_free(script_config(SCRIPT, **settings), script=SCRIPT)
    assert again["mtl_source"] == "trained" and again["accuracy"] == first["accuracy"]
    assert "cannot be read" in _log_text(again, tmp_path)
    assert load_file(again["mtl_file"]).keys() == load_file(first["mtl_file"]).keys()


def test_a_surgery_run_on_the_traditional_mtl_base_loads_its_encoder(small):
    report, out, settings = small
    namespace = {"__file__": os.path.join(SRC, "main_Surgery.py"), **script_variables("main_Surgery.py")}
    args = _args(settings)
    surgery = main_on_any_base(run_surgery, namespace, [*args, "--method_name=traditional_mtl",
                                                        "--surgery=v1", "--iterations=2",
                                                        "--eval_iterations=2", "--rank=2"])
    assert surgery["base"] == "traditional_mtl_experts_4" and surgery["mtl_source"] == "cache"
    assert surgery["mtl_file"] == report["mtl_file"]
    assert "loaded the trained encoder" in _log_text(surgery, out)
    assert method_label(surgery) == "Traditional MTL (experts' recipe, 4 steps) + Surgery v1"


def test_two_gloo_ranks_train_what_one_process_trains(small, tmp_path):
    one, _, settings = small
    two_out = tmp_path / "two"
    two_settings = {**settings, "log_dir": str(two_out / "logs"), "cache_dir": str(two_out / "cache")}
    _torchrun([os.path.join(SRC, SCRIPT), *_args(two_settings)], cwd=str(tmp_path))
    two, = _reports(two_out / "logs")   # rank 1 wrote no report
    assert two["compute"]["world_size"] == RANKS and one["compute"]["world_size"] == 1
    assert two["mtl_history"] == pytest.approx(one["mtl_history"], abs=1e-5)
    # the gradient itself (its norm before clipping): a rank's loss scaled wrongly would show here,
    # where Adam's normalised steps would hide it in the weights
    assert two["mtl_grad_norms"] == pytest.approx(one["mtl_grad_norms"], rel=1e-5)
    assert two["accuracy"] == pytest.approx(one["accuracy"], abs=1e-6)
    a, b = load_file(one["mtl_file"]), load_file(two["mtl_file"])
    theta0 = loaded_pretrained(settings)
    assert a.keys() == b.keys()
    # Adam divides by √v: rounding in a near-zero gradient moves a weight by up to lr, so the
    # weights agree to a small part of how far they moved, not to float precision
    moved = max((a[k] - theta0[k]).abs().max().item() for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 0.05 * moved


# ---------------------------------------------------------------- the loop itself
class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def loop_inputs(micro_benchmark, tmp_path_factory):
    """A run's heads and training splits, and the experts' recipe cut to 5 steps of 8 per task."""
    out = tmp_path_factory.mktemp("mtl_loop")
    run = Run(script_config(SCRIPT, **_settings(micro_benchmark, out)), SCRIPT, "traditional_mtl")
    splits = mtl_method.train_splits(run)
    recipe = experts_recipe({"steps": 5, "batch_size": 8, "lr": 2e-3, "weight_decay": 0.1, "warmup": 1,
                             "crop_scale": [0.9, 1.0], "grad_clip": 1.0})
    return run, splits, recipe


def _train(inputs, folder, kill_at=None, preload=True, logger=None):
    run, splits, recipe = inputs
    encoder = build_image_encoder(run.setup.arch, run.setup.checkpoints.pretrained())
    data = {t: TaskImages(ds, preload=preload, name=t) for t, ds in splits.items()}

    def on_step(step):
        if step == kill_at:
            raise Killed

    result = train_multitask(encoder, TASKS, data, run.heads, recipe, seed=3, checkpoint_dir=str(folder),
                             checkpoint_every=2, run_key={"test": "resume"}, on_step=on_step, logger=logger)
    return encoder.state_dict(), result


def test_a_killed_run_resumes_bit_identically(loop_inputs, tmp_path):
    full, full_result = _train(loop_inputs, tmp_path / "a")
    with pytest.raises(Killed):
        _train(loop_inputs, tmp_path / "b", kill_at=3)   # the last save was at step 2: step 3 is redone
    resumed, resumed_result = _train(loop_inputs, tmp_path / "b")
    assert resumed_result.resumed_at == 2
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert full_result.losses == resumed_result.losses and len(full_result.losses) == 5
    pretrained = loop_inputs[0].setup.checkpoints.pretrained()
    moved = [k for k in full if not torch.equal(full[k], pretrained[k])]
    assert moved and all(k.startswith("model.visual.") for k in moved)   # only the vision tower trains


def test_a_killed_script_run_resumes_from_its_resume_dir_to_the_same_encoder(micro_benchmark, tmp_path,
                                                                             monkeypatch):
    """The run's own key (θ0, heads, data, recipe, seed) names its resume state: a second run of the
    same settings finds what the killed one saved."""
    reference = run_data_free(script_config(SCRIPT, **_settings(micro_benchmark, tmp_path / "ref",
                                                                mtl_steps=5, mtl_batch_size=4)), script=SCRIPT)
    settings = _settings(micro_benchmark, tmp_path / "run", mtl_steps=5, mtl_batch_size=4,
                         resume_dir=str(tmp_path / "resume"), checkpoint_every=2)
    train = mtl_method.train_multitask

    def killed_at_step_3(*args, **kwargs):
        def on_step(step):
            if step == 3:
                raise Killed
        return train(*args, on_step=on_step, **kwargs)

    monkeypatch.setattr(mtl_method, "train_multitask", killed_at_step_3)
    with pytest.raises(Killed):
        run_data_free(script_config(SCRIPT, **settings), script=SCRIPT)
    monkeypatch.setattr(mtl_method, "train_multitask", train)
    resumed = run_data_free(script_config(SCRIPT, **settings), script=SCRIPT)
    assert "Resumed Traditional MTL" in _log_text(resumed, tmp_path / "run")
    assert resumed["mtl_history"] == reference["mtl_history"]
    a, b = load_file(reference["mtl_file"]), load_file(resumed["mtl_file"])
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_dataloader_path_draws_and_trains_exactly_as_the_preloaded_one(loop_inputs, tmp_path):
    preloaded, a = _train(loop_inputs, tmp_path / "a")
    streamed, b = _train(loop_inputs, tmp_path / "b", preload=False)
    assert a.losses == b.losses and all(torch.equal(preloaded[k], streamed[k]) for k in preloaded)


def test_batches_are_full_epochs_of_a_seeded_permutation():
    n, bs = 10, 4
    drawn = torch.cat([step_indices(n, bs, 0, 1, step) for step in range(5)])   # 20 = two epochs
    assert sorted(drawn[:10].tolist()) == list(range(n)) and sorted(drawn[10:].tolist()) == list(range(n))
    assert torch.equal(step_indices(n, bs, 0, 1, 3), step_indices(n, bs, 0, 1, 3))
    assert not torch.equal(drawn, torch.cat([step_indices(n, bs, 0, 2, s) for s in range(5)]))  # per task


# ---------------------------------------------------------------- recipes and refusals
def test_the_recipe_auto_is_the_experts_on_the_embedded_benchmark_and_fusionbench_elsewhere(micro_benchmark):
    ckpt, _ = micro_benchmark
    folder = os.path.join(ckpt, "taskmerge-tiny-micro")
    values = {f.name: "auto" for f in dataclasses.fields(mtl_method.TraditionalMTLSettings)}
    s = mtl_method.TraditionalMTLSettings(**{**values, "seed": 0, "resume_dir": "", "checkpoint_every": 1})
    embedded = SimpleNamespace(setup=SimpleNamespace(model_dir=folder, embedded=True))
    real = SimpleNamespace(setup=SimpleNamespace(model_dir=str(ckpt), embedded=False))
    name, recipe = mtl_method.resolve_recipe(embedded, s)
    assert name == "experts" and (recipe.steps, recipe.batch_size, recipe.lr) == (40, 32, 2e-3)
    assert mtl_method.resolve_recipe(real, s) == ("fusionbench", FUSIONBENCH)
    # FusionBench's clip_finetune.yaml: lr 1e-5, 4000 steps, batch 128 per task, weight decay 0, Adam
    assert (FUSIONBENCH.lr, FUSIONBENCH.steps, FUSIONBENCH.batch_size, FUSIONBENCH.weight_decay,
            FUSIONBENCH.optimizer, FUSIONBENCH.grad_clip, FUSIONBENCH.crop_scale) == (1e-5, 4000, 128, 0.0,
                                                                                     "adam", None, None)
    overridden = dataclasses.replace(s, mtl_recipe="fusionbench", mtl_steps=7, mtl_lr=3e-4)
    name, recipe = mtl_method.resolve_recipe(real, overridden)
    assert recipe == dataclasses.replace(FUSIONBENCH, steps=7, lr=3e-4)
    with pytest.raises(ConfigError, match="mtl_recipe='experts'.*embedded benchmark"):
        mtl_method.resolve_recipe(real, dataclasses.replace(s, mtl_recipe="experts"))


def test_a_task_without_a_training_split_is_one_clear_error(micro_benchmark, tmp_path, monkeypatch):
    real_task_data = mtl_method.task_data

    def without_fashion_train(setup, task, split="test"):
        data = real_task_data(setup, task, split)
        return dataclasses.replace(data, train=None) if task == "Fashion" else data

    monkeypatch.setattr(mtl_method, "task_data", without_fashion_train)
    _, data = micro_benchmark
    with pytest.raises(DatasetLayoutError, match=f"Fashion: no training split under {data}"):
        run_data_free(script_config(SCRIPT, **_settings(micro_benchmark, tmp_path)), script=SCRIPT)


def test_a_model_file_that_does_not_exist_is_refused():
    with pytest.raises(ConfigError, match="model_file=.*no such file"):
        script_config("eval_single_task.py", model_file="/nonexistent/merged.safetensors")


# ---------------------------------------------------------------- a FusionBench download
def test_a_fusionbench_download_trains_its_vision_model_with_fusionbench_recipe(fusionbench_root, tmp_path,
                                                                               monkeypatch):
    """On real layouts (tiny files of FusionBench's formats: HF CLIP folders, hub parquet) "auto" is
    FusionBench's recipe, which trains the vision model but not the projection (clip_finetune.py
    L261-269 optimises `vision_model` only)."""
    from test_families_end_to_end import _tiny_encoder, _tiny_text_tower

    from taskmerge.models.encoders import ImageEncoder
    from taskmerge.models.hf_encoders import create_clip_from_config
    from taskmerge.runs import setup as run_setup
    config, oc_config = fusionbench_root
    patched = _tiny_encoder(lambda: ImageEncoder(create_clip_from_config(oc_config)))
    monkeypatch.setattr(run_setup, "build_image_encoder", patched)
    _tiny_text_tower(monkeypatch, oc_config)
    known = script_variables(SCRIPT)
    settings = {**{k: v for k, v in config.items() if k in known}, "tasks": ["Cars", "DTD"],
                "log_dir": str(tmp_path / "logs"), "cache_dir": str(tmp_path / "cache"), "resume_dir": "",
                "device": "cpu", "mtl_steps": 2, "mtl_batch_size": 4, "mtl_lr": 1e-3}
    report = run_data_free(script_config(SCRIPT, **settings), script=SCRIPT)
    assert report["checkpoint_family"] == "fusionbench" and report["mtl_source"] == "trained"
    assert report["mtl"] == {"recipe": "fusionbench", "steps": 2, "batch_size": 4, "lr": 1e-3,
                             "weight_decay": 0.0, "optimizer": "adam", "warmup": 0, "grad_clip": None,
                             "crop_scale": None, "train_projection": False, "seed": 0}
    assert method_label(report) == "Traditional MTL (FusionBench recipe, 2 steps)"
    setup = run_setup.resolve_setup("ViT-B-32", config["checkpoint_dir"], config["data_location"],
                                    ["Cars", "DTD"], "parquet")
    theta0, trained = setup.checkpoints.pretrained(), load_file(report["mtl_file"])
    moved = {k for k in trained if not torch.equal(trained[k], theta0[k])}
    assert "model.visual.proj" not in moved
    assert moved and all(k.startswith("model.visual.") for k in moved)
