"""The parts of benchmarks/fusionbench_parity.py that need no FusionBench: the key mapping its
relative L2 is measured in, the measure itself, the DARE mask spans injected into FusionBench, and
the fixture writer (checkpoints our CheckpointSet.discover accepts; parquet sets our reader reads,
written with the `datasets` library, skipped where it is not installed)."""
from __future__ import annotations

import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

from fusionbench_keys import flat_span, hf_vision_key, ours_to_hf, relative_l2, vision_spans  # noqa: E402
import fusionbench_fixtures as fixtures  # noqa: E402

from taskmerge.merging.dare import keep_mask  # noqa: E402
from taskmerge.storage.checkpoints import CheckpointSet  # noqa: E402
from taskmerge.storage.hf_checkpoints import convert_image_encoder, read_hf_checkpoint  # noqa: E402

TASKS = ["MNIST", "SVHN"]


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("parity"))
    fixtures.write_checkpoints(root, "tiny", TASKS, seed=3)
    return root


def test_checkpoints_are_found_as_the_fusionbench_family(fixture_root):
    ckpt = CheckpointSet.discover(os.path.join(fixture_root, "checkpoints"), "ViT-B-32", TASKS)
    assert ckpt.family == "fusionbench"
    ckpt.validate()
    assert ckpt.finetuned_path("SVHN") == fixtures.expert_folder(fixture_root, "SVHN")
    # each expert moved away from θ0 (a zero task vector would make every method agree trivially)
    theta0, expert = ckpt.pretrained(), ckpt.finetuned("MNIST")
    key = "model.visual.transformer.resblocks.0.attn.in_proj_weight"
    assert not torch.equal(theta0[key], expert[key])


def test_processor_files_tokenise_as_open_clip(fixture_root):
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPProcessor
    processor = CLIPProcessor.from_pretrained(fixtures.pretrained_folder(fixture_root))
    text = "a photo of the number: 7, a Ford F-150's cab."
    assert processor.tokenizer(text)["input_ids"] == [49406, *SimpleTokenizer().encode(text), 49407]
    assert processor.image_processor.crop_size == {"height": 32, "width": 32}


def test_ours_to_hf_inverts_the_conversion(fixture_root):
    hf = read_hf_checkpoint(fixtures.pretrained_folder(fixture_root))
    ours = convert_image_encoder(hf.tensors, hf.config)
    back = ours_to_hf(ours, hf.config)
    vision = {k for k in hf.tensors if k.startswith("vision_model.")}
    assert set(back) == vision  # every vision tensor, q/k/v apart, and nothing of the text side
    for k in vision:
        assert torch.equal(back[k], hf.tensors[k]), k
    assert vision_spans(hf.config)["vision_model.encoder.layers.1.self_attn.k_proj.weight"] == (
        "model.visual.transformer.resblocks.1.attn.in_proj_weight", 1, 3)


def test_flat_spans_are_the_thirds_of_in_proj(fixture_root):
    config = read_hf_checkpoint(fixtures.pretrained_folder(fixture_root)).config
    d = config["vision_config"]["hidden_size"]
    key = "model.visual.transformer.resblocks.0.attn.in_proj_weight"
    assert flat_span(config, "encoder.layers.0.self_attn.v_proj.weight", (d, d)) == (key, 2 * d * d, 3 * d * d)
    assert flat_span(config, "vision_model.encoder.layers.0.self_attn.q_proj.bias", (d,)) == (
        key.replace("weight", "bias"), 0, d)
    assert flat_span(config, "post_layernorm.weight", (d,)) == ("model.visual.ln_post.weight", 0, d)
    # the injected mask of v is the last third of in_proj's mask, as our DARE reads it
    whole = keep_mask(0, 1, key, 0, 3 * d * d, 0.5)
    assert torch.equal(keep_mask(0, 1, key, 2 * d * d, 3 * d * d, 0.5), whole[2 * d * d:])


def test_relative_l2_per_key_and_overall():
    theta0 = {"a": torch.zeros(4), "b": torch.ones(2), "c": torch.zeros(3)}
    theirs = {"a": torch.tensor([1.0, 0, 0, 0]), "b": torch.tensor([1.0, 3.0]), "c": torch.zeros(3)}
    ours = {"a": torch.tensor([1.1, 0, 0, 0]), "b": torch.tensor([1.0, 3.0]), "c": torch.tensor([0, 0, 1e-3]),
            "extra": torch.zeros(1)}
    r = relative_l2(ours, theirs, theta0)
    assert r["per_key"]["a"] == pytest.approx(0.1) and r["per_key"]["b"] == 0.0
    assert math.isinf(r["per_key"]["c"]) and r["worst_key"] == "c"  # FB kept θ0, ours moved
    assert r["overall"] == pytest.approx(math.sqrt((0.01 + 1e-6) / (1 + 4)))
    assert r["only_ours"] == ["extra"] and r["only_theirs"] == []
    assert relative_l2(theirs, theirs, theta0)["worst"] == 0.0
    assert hf_vision_key("embeddings.class_embedding") == "vision_model.embeddings.class_embedding"


def test_datasets_are_read_by_our_parquet_reader(fixture_root):
    pytest.importorskip("datasets")
    from taskmerge.datasets.parquet import FIXED_CLASSNAMES, get_parquet_task
    names = {t: list(FIXED_CLASSNAMES[t]) for t in TASKS}  # names in our order (the reader checks it)
    fixtures.write_datasets(fixture_root, "tiny", names, images_per_task=5, seed=1)
    assert fixtures.dataset_file(fixture_root, "SVHN").endswith(
        os.path.join("svhn", "cropped_digits", "test-00000-of-00001.parquet"))
    data = get_parquet_task("SVHN", os.path.join(fixture_root, "data"))
    assert len(data.test) == 5 and data.test.classlabel_names == names["SVHN"]
    image, label = data.test[0]
    assert 29 <= min(image.size) and max(image.size) <= 47 and 0 <= label < 10
    assert len(get_parquet_task("MNIST", os.path.join(fixture_root, "data")).test) == 5
    assert data.train is None  # no train split unless asked for


def test_train_splits_are_read_as_the_tasks_training_data(tmp_path):
    """The data-aware rows' training images: our reader takes the file beside the test split as
    TaskData.train (what their scripts sample from), and the test images do not change with it."""
    pytest.importorskip("datasets")
    from taskmerge.datasets.parquet import FIXED_CLASSNAMES, get_parquet_task
    names = {t: list(FIXED_CLASSNAMES[t]) for t in TASKS}  # names in our order (the reader checks it)
    with_train, without = str(tmp_path / "a"), str(tmp_path / "b")
    fixtures.write_datasets(with_train, "tiny", names, images_per_task=4, seed=2, train_images_per_task=6)
    fixtures.write_datasets(without, "tiny", names, images_per_task=4, seed=2)
    for task in TASKS:
        test_file, train_file = fixtures.dataset_file(with_train, task), fixtures.dataset_file(
            with_train, task, "train")
        assert os.path.dirname(train_file) == os.path.dirname(test_file)
        assert os.path.basename(train_file) == "train-00000-of-00001.parquet"
        data = get_parquet_task(task, os.path.join(with_train, "data"))
        other = get_parquet_task(task, os.path.join(without, "data"))
        assert len(data.train) == 6 and len(data.test) == 4 and other.train is None
        for i in range(4):
            assert data.test[i][0].tobytes() == other.test[i][0].tobytes()
        # the training images are images of their own, not copies of the test ones
        assert {data.train[i][0].tobytes() for i in range(6)}.isdisjoint(
            data.test[i][0].tobytes() for i in range(4))


def test_table_flags_what_is_off_target():
    import fusionbench_parity as parity
    tasks = parity.TASKS[:2]
    w_ok = {"fb32": {"worst": 5e-5, "worst_key": "vision_model.post_layernorm.weight",
                     "worst_outside_qkv": 5e-5}, "task": ""}
    w_off = {"fb32": {"worst": 0.5, "worst_key": "vision_model.encoder.layers.0.self_attn.q_proj.weight",
                      "worst_outside_qkv": 1e-6}, "task": "",
             "f64": {"worst": 0.5}, "fb32_vs_f64": {"worst": 2e-5}}
    acc = {t: 0.5 for t in parity.TASKS}
    results = {"TA": {"weights": w_ok, "accuracy": acc},
               "Iso-C": {"weights": w_off, "accuracy": dict(acc, **{tasks[0]: 0.25})}}
    heads = {t: "1.0e-07" for t in parity.TASKS}
    heads[tasks[1]] = "10 vs 9 classes"
    meta = {"date": "d", "size": "tiny", "images": 4, "labels": "expert", "versions": {}, "commit": "c",
            "our_transformers": "5"}
    pixels = {t: "0.0e+00 (0/4)" for t in parity.TASKS}
    text = parity.table(results, heads, {"TA": acc, "Iso-C": acc, "Individual": acc}, acc, meta, pixels)
    assert "| yes |" in next(line for line in text.splitlines() if line.startswith("| Pixels"))
    pixels[tasks[0]] = "9.3e-01 (1/4)"
    text = parity.table(results, heads, {"TA": acc, "Iso-C": acc, "Individual": acc}, acc, meta, pixels)
    assert "| NO |" in next(line for line in text.splitlines() if line.startswith("| Pixels"))
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "| yes |" in rows["TA"] and "| NO |" in rows["Iso-C"]
    assert "50.0 / 50.0" in rows["TA"] and "25.0 / 50.0 ≠" in rows["Iso-C"]
    assert "outside q/k/v: 1.0e-06" in rows["Iso-C"] and "FB float32 vs float64: 2.0e-05" in rows["Iso-C"]
    assert "| NO |" in rows["Heads (max \\|Δ\\| of unit class embeddings)"]
    assert "not compared yet" in rows["AdaMerging"] and "RegMean" not in rows and "Fisher" not in rows


def test_regmean_rows_are_judged_with_float64_statistics_on_both_sides():
    """RegMean's rows: the float32 distances are shown, the target is ours with float64 statistics
    against FusionBench's float64 run (the algorithms, not float32's rounding of an ill-conditioned
    Σ G̃); a row whose float64 distance is off says NO."""
    import fusionbench_parity as parity
    assert parity.OURS["RegMean"][2] == parity.OURS["RegMean++"][2] == "float64"
    assert parity.OURS["Fisher"][2] == "exact"
    key = "vision_model.encoder.layers.0.self_attn.out_proj.weight"

    def weights(ours64: float) -> dict:
        return {"fb32": {"worst": 1e-3, "worst_key": key, "worst_outside_qkv": 1e-3}, "task": "",
                "f64": {"worst": 1.5e-4}, "fb32_vs_f64": {"worst": 1e-3},
                "ours64": {"worst": ours64, "worst_key": key}}
    acc = {t: 0.5 for t in parity.TASKS}
    results = {"RegMean": {"weights": weights(1e-5), "accuracy": acc},
               "RegMean++": {"weights": weights(3e-4), "accuracy": acc}}
    meta = {"date": "d", "size": "tiny", "images": 4, "labels": "expert", "versions": {}, "commit": "c",
            "our_transformers": "5", "train_images": 32}
    heads = {t: "1.0e-07" for t in parity.TASKS}
    text = parity.table(results, heads, {"RegMean": acc, "RegMean++": acc, "Individual": acc}, acc, meta)
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}
    assert "| yes |" in rows["RegMean"] and "| NO |" in rows["RegMean++"]
    assert "ours with float64 statistics vs FB float64: 1.0e-05" in rows["RegMean"]
    assert "FB float32 vs float64: 1.0e-03" in rows["RegMean"] and "32 training images per task" in text
