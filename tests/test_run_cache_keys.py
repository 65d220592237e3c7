"""Caches, resume states and saved artefacts are reused only when every input that changes their value
matches (checkpoints, heads, data, settings); otherwise they are recomputed and the log says why."""
import json
import os

import numpy as np
import pytest
import torch
from safetensors import safe_open

from taskmerge.adaptive.adamerging_coefficients import save_coefficients
from taskmerge.adaptive.adaptation_data import TaskImages
from taskmerge.adaptive.feature_cache import FeatureCache, base_and_expert_features
from taskmerge.datasets.base import ArrayDataset
from taskmerge.embedded.build import ensure_embedded_benchmark
from taskmerge.models.encoders import build_image_encoder
from taskmerge.models.heads import ClassificationHead
from taskmerge.runs.adaptive import run_adamerging, run_surgery
from taskmerge.runs.data_free import run_data_free, run_single_task_eval
from taskmerge.runs.evaluation import evaluate
from taskmerge.runs.identity import data_identity, head_digest
from taskmerge.runs.heads import load_heads
from taskmerge.runs.setup import encoder_for, resolve_setup, task_data

from script_variables import config_from as _config

MODEL = "taskmerge-tiny-micro"


@pytest.fixture
def bench(private_micro, tmp_path):
    """A private copy of the micro benchmark (its caches are what these tests change)."""
    ckpt, data, folder = private_micro
    config = {"model_name": MODEL, "checkpoint_dir": ckpt, "data_location": data,
              "tasks": [], "log_dir": str(tmp_path / "logs"), "save_dir": str(tmp_path / "merged"),
              "resume_dir": str(tmp_path / "resume"), "batch_size": 128, "seed": 0}
    return config, folder


def _log(report, config):
    return next(open(os.path.join(r, f)).read() for r, _, fs in os.walk(config["log_dir"])
                for f in fs if f == report["log"])


def test_replaced_head_recomputes_the_individual_accuracy(bench):
    config, folder = bench
    first = run_single_task_eval(_config("eval_single_task.py", {**config, "split": "test"}),
                         script="eval_single_task.py")
    head = torch.load(folder / "head_Animals.pt", weights_only=True)
    head["weight"] = -head["weight"]  # the expert's argmax becomes its argmin
    torch.save(head, folder / "head_Animals.pt")
    setup = resolve_setup(MODEL, config["checkpoint_dir"], config["data_location"])
    expert = encoder_for(setup, setup.checkpoints.finetuned("Animals"))
    expected = evaluate(expert, load_heads(setup)["Animals"], task_data(setup, "Animals").test)
    assert expected != first["individual_accuracy"]["Animals"]  # else this test could not tell
    second = run_single_task_eval(_config("eval_single_task.py", {**config, "split": "test"}),
                         script="eval_single_task.py")
    assert second["individual_accuracy"]["Animals"] == expected
    assert {t: a for t, a in second["individual_accuracy"].items() if t != "Animals"} == \
        {t: a for t, a in first["individual_accuracy"].items() if t != "Animals"}
    assert "Individual accuracy of Animals (test): computing (head changed)" in _log(second, config)
    assert "Individual accuracy of Digits" not in _log(second, config)


def test_merges_of_different_task_lists_are_saved_apart_with_their_provenance(bench):
    config, _ = bench
    two_tasks = {**config, "tasks": ["Digits", "Fashion"], "scaling_coef": 0.3}
    two = run_data_free(_config("main_TaskArithmetic.py", two_tasks), script="ta.py")
    four = run_data_free(_config("main_TaskArithmetic.py", {**config, "scaling_coef": 0.3}), script="ta.py")
    assert two["merged_file"] != four["merged_file"]
    for report in (two, four):
        with safe_open(report["merged_file"], framework="pt") as f:
            provenance = json.loads(f.metadata()["provenance"])
        assert provenance["tasks"] == report["tasks"] and provenance["settings"]["scaling_coef"] == 0.3
        assert set(provenance["checkpoints"]) == {"pretrained", *report["tasks"]}


def _adamerging(config, **kw):
    return run_adamerging(_config("main_AdaMerging.py", {
        **config, "method_name": "tw_adamerging", "adamerging_steps": 2, "adamerging_eval_every": 2,
        "checkpoint_every": 1, **kw}), script="ada.py")


def test_adamerging_resume_and_saved_coefficients_are_keyed_by_the_prior(bench):
    config, _ = bench
    low = _adamerging(config, coefficients="learn", prior=0.3)
    high = _adamerging(config, coefficients="learn", prior=0.6)
    fresh = _adamerging({**config, "resume_dir": ""}, coefficients="learn", prior=0.6)
    assert high["coefficients"] == fresh["coefficients"] != low["coefficients"]
    assert "Resumed" not in _log(high, config)
    assert "adamerging: no saved state for these inputs" in _log(high, config)
    assert "differs in run.prior;" in _log(high, config)  # the log says which input changed
    again = _adamerging(config, coefficients="auto", prior=0.6)  # reuses the saved 0.6 coefficients
    assert again["coefficients_source"] == high["coefficients_file"]
    assert again["coefficients"] == high["coefficients"]
    other = _adamerging(config, coefficients="auto", prior=0.45)
    assert other["coefficients_source"] == "learn"
    assert "no saved coefficients learned from these inputs" in _log(other, config)
    why = _log(other, config).split("no saved coefficients")[1].splitlines()[0]
    assert "learned with other prior)" in why


def test_surgery_does_not_resume_on_a_base_with_other_coefficients(bench, tmp_path):
    config, _ = bench
    setup = resolve_setup(MODEL, config["checkpoint_dir"], config["data_location"])
    files = []
    for lam in (0.2, 0.5):
        path = str(tmp_path / f"coef_{lam}.json")
        save_coefficients(path, torch.tensor([[1.0] + [lam] * len(setup.tasks)]), method="tw_adamerging",
                          model_name=MODEL, tasks=setup.tasks)
        files.append(path)
    surgery = {"method_name": "tw_adamerging", "surgery": "v1", "online": False, "iterations": 2,
               "eval_iterations": 2, "rank": 4, "checkpoint_every": 1}
    def surgery_on(coefficients, **kw):
        settings = {**config, **surgery, "coefficients": coefficients, **kw}
        return run_surgery(_config("main_AdaMerging_with_surgery.py", settings), script="surgery.py")

    first = surgery_on(files[0])
    second = surgery_on(files[1])
    fresh = surgery_on(files[1], resume_dir="")
    assert "Resumed" not in _log(second, config)
    assert "differs in run.base.coefficients;" in _log(second, config)
    assert second["history"] == fresh["history"] != first["history"]


def test_rebuilding_a_lost_head_keeps_the_learned_coefficients(bench):
    config, folder = bench
    learned = _adamerging(config, coefficients="auto", prior=0.3)
    assert learned["coefficients_source"] == "learn"
    os.remove(folder / "head_Digits.pt")
    ensure_embedded_benchmark(config["checkpoint_dir"], config["data_location"], micro=True, progress=False)
    assert os.path.exists(learned["coefficients_file"])
    again = _adamerging(config, coefficients="auto", prior=0.3)
    assert again["coefficients_source"] == learned["coefficients_file"]
    assert again["accuracy"] == learned["accuracy"]


def test_expert_features_are_cached_per_checkpoint_and_data_and_base_features_never(bench, tmp_path):
    config, _ = bench
    setup = resolve_setup(MODEL, config["checkpoint_dir"], config["data_location"])
    digits = TaskImages(task_data(setup, "Digits").test, name="Digits")
    fashion = TaskImages(task_data(setup, "Fashion").test, name="Fashion")
    cache, loads = FeatureCache(str(tmp_path / "features")), []

    def load_expert():
        loads.append(1)
        return build_image_encoder(setup.arch, setup.checkpoints.finetuned("Digits"))

    def features(base, images, digest="d1"):
        return base_and_expert_features(base, cache, load_expert, images, model_name=MODEL,
                                        checkpoint_digest=digest, dataset_id="Digits/test@data", blocks=False)

    base0, base1 = (build_image_encoder(setup.arch, sd) for sd in
                    (setup.checkpoints.pretrained(), setup.checkpoints.finetuned("Fashion")))
    b0, e0 = features(base0, digits)
    b1, e1 = features(base1, digits)  # expert from the cache, the other base computed
    assert len(loads) == 1 and torch.equal(e0["final"], e1["final"])
    assert not torch.equal(b0["final"], b1["final"])
    features(base0, fashion)  # same dataset name, other images
    features(base0, digits, digest="d2")  # another checkpoint
    assert len(loads) == 3


def test_data_identity_and_head_digest_follow_the_values():
    images = np.zeros((6, 4, 4, 3), dtype=np.uint8)
    labels = [0, 1, 2, 0, 1, 2]

    def dataset(x, y):
        return ArrayDataset(x, y, transform=lambda im: torch.from_numpy(np.array(im)))

    base = data_identity("T", "test", "data", dataset(images, labels))
    relabelled = data_identity("T", "test", "data", dataset(images, labels[:3] + [2] + labels[4:]))
    shorter = data_identity("T", "test", "data", dataset(images[:5], labels[:5]))
    val = data_identity("T", "val", "data", dataset(images, labels))
    assert len({json.dumps(d, sort_keys=True) for d in (base, relabelled, shorter, val)}) == 4
    weight = torch.randn(3, 8)
    assert head_digest(ClassificationHead(weight.clone())) == head_digest(ClassificationHead(weight.clone()))
    assert head_digest(ClassificationHead(weight)) != head_digest(ClassificationHead(-weight))


def _identity(dataset):
    from taskmerge.datasets.base import dataset_content_digest
    return dataset_content_digest(dataset)


def test_data_identity_sees_every_label_not_a_sample_of_them():
    # 9 of 12 MNIST test labels changed while items 0, 6 and 11 kept theirs: the three-item sample
    # could not see it and a cached individual accuracy of the old labels was reused.
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (12, 4, 4, 3), dtype=np.uint8)
    labels = list(rng.integers(0, 3, 12))
    changed = [(y + 1) % 3 if i not in (0, 6, 11) else y for i, y in enumerate(labels)]

    def dataset(y, x=images):
        return ArrayDataset(x, y, transform=lambda im: torch.from_numpy(np.array(im)))

    before, after = data_identity("T", "test", "data", dataset(labels)), data_identity("T", "test", "data", dataset(changed))
    assert before["items"] == after["items"]  # the sample alone is blind to it
    assert before["content"] != after["content"]
    pixel = images.copy()
    pixel[3, 1, 1, 0] ^= 1
    assert _identity(dataset(labels, pixel)) != _identity(dataset(labels))


def test_data_identity_sees_every_image_file(tmp_path):
    from PIL import Image

    from taskmerge.datasets.real import ImageFileDataset
    paths = []
    for i in range(5):
        path = tmp_path / f"{i}.png"
        Image.fromarray(np.full((4, 4, 3), i * 10, dtype=np.uint8)).save(path)
        paths.append(str(path))
    samples = [(p, i % 2) for i, p in enumerate(paths)]
    first = _identity(ImageFileDataset("T", samples, None))
    assert _identity(ImageFileDataset("T", samples, None)) == first
    assert _identity(ImageFileDataset("T", [(p, 1 - y) if i == 2 else (p, y) for i, (p, y) in enumerate(samples)], None)) != first
    # An image rewritten in place with its mtime put back (cp -p, rsync -a) is a new file.
    st = os.stat(paths[3])
    Image.fromarray(np.full((4, 4, 3), 99, dtype=np.uint8)).save(paths[3])
    os.utime(paths[3], ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _identity(ImageFileDataset("T", samples, None)) != first


def test_data_identity_of_a_validation_carve_names_its_indices():
    from torch.utils.data import Subset
    images = np.zeros((6, 4, 4, 3), dtype=np.uint8)
    full = ArrayDataset(images, [0, 1, 2, 0, 1, 2])
    assert _identity(Subset(full, [0, 1, 2])) != _identity(Subset(full, [3, 4, 5]))
    assert _identity(Subset(full, [0, 1, 2])) == _identity(Subset(ArrayDataset(images, [0, 1, 2, 0, 1, 2]), [0, 1, 2]))


def test_data_identity_sees_a_parquet_shard_rewritten(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from taskmerge.datasets.parquet import ParquetImageDataset

    def write(labels):
        table = pa.table({"image": [{"bytes": b"x" * 10, "path": None}] * 3, "label": labels})
        path = tmp_path / "test-00000-of-00001.parquet"
        pq.write_table(table, path)
        return str(path)

    path = write([0, 1, 0])
    first = _identity(ParquetImageDataset("T", [path], 2, None))
    st = os.stat(path)
    write([0, 1, 1])
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _identity(ParquetImageDataset("T", [path], 2, None)) != first


def _saved(config):
    folder = os.path.join(config["save_dir"], MODEL)
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_a_surgery_base_with_nan_values_is_refused_before_anything_is_saved(bench):
    from taskmerge.storage.errors import InputError
    config, _ = bench
    settings = {**config, "method_name": "task_arithmetic", "scaling_coef": 1e300, "surgery": "v1",
                "online": False, "iterations": 1, "eval_iterations": 1, "rank": 4}
    with pytest.raises(InputError, match="nothing was saved"):
        run_surgery(_config("main_TaskArithmetic_with_surgery.py", settings), script="surgery.py")
    assert _saved(config) == []


def test_merges_with_other_settings_are_saved_to_other_files(bench):
    config, _ = bench
    surgery = {**config, "method_name": "task_arithmetic", "surgery": "v1", "online": False,
               "iterations": 1, "eval_iterations": 1, "rank": 4, "dare_p": 0.5}
    for seed in (0, 1):
        run_surgery(_config("main_TaskArithmetic_with_surgery.py", {**surgery, "dare_seed": seed}),
                    script="surgery.py")
    assert len(_saved(config)) == 2
    for prior in (0.3, 0.6):
        _adamerging(config, coefficients="learn", prior=prior)
    assert len(_saved(config)) == 4
