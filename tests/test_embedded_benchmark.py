"""The embedded benchmark's model: micro build, layout, heads, experts, caching, determinism."""
import copy
import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from taskmerge.embedded import build as eb
from taskmerge.embedded import sources as embedded_sources
from taskmerge.embedded.finetuning import cosine_lr, random_resized_crop
from taskmerge.embedded.pretraining import CaptionedImages, encode_captions, partner_classes
from taskmerge.embedded.tasks import get_embedded_task
from taskmerge.models.encoders import TINY_MODEL, build_image_encoder, create_clip, eval_transform
from taskmerge.models.heads import ClassificationHead, build_zeroshot_head
from taskmerge.models.tokenizers import get_tokenizer

# A recipe small enough to build several times in a test: checks mechanics, not accuracy.
TOY_RECIPE = copy.deepcopy(eb.MICRO_RECIPE)
TOY_RECIPE["pretrain"].update(steps=3, batch_size=16, warmup=1)
TOY_RECIPE["finetune"].update(steps=2, batch_size=8, warmup=1)


def _files(folder):
    out = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


@pytest.fixture(scope="module")
def data_dir(micro_benchmark):
    return micro_benchmark[1]


@pytest.fixture(scope="module")
def micro(micro_benchmark):
    # The session's micro build (conftest.py), shared with the end-to-end tests: built once.
    ckpt, data = micro_benchmark
    folder = eb.ensure_embedded_benchmark(ckpt, data, micro=True, progress=False)
    with open(os.path.join(folder, "manifest.json")) as f:
        manifest = json.load(f)
    return ckpt, folder, manifest


def test_layout_and_loading(micro):
    _, folder, manifest = micro
    assert os.path.basename(folder) == eb.MICRO_MODEL
    assert manifest["model"] == TINY_MODEL and len(manifest["tasks"]) >= 2
    theta0 = torch.load(os.path.join(folder, "zeroshot.pt"), weights_only=True)
    assert all(k.startswith("model.") for k in theta0)
    build_image_encoder(TINY_MODEL, theta0)
    for task in manifest["tasks"]:
        expert = torch.load(os.path.join(folder, task, "finetuned.pt"), weights_only=True)
        build_image_encoder(TINY_MODEL, expert)
        head = torch.load(os.path.join(folder, f"head_{task}.pt"), weights_only=True)
        assert set(head) == {"weight", "bias"} and torch.all(head["bias"] == 0)


def test_heads_are_real_clip_zeroshot_heads(micro, data_dir):
    _, folder, manifest = micro
    clip = create_clip(TINY_MODEL)
    clip.load_state_dict(load_file(os.path.join(folder, "clip_pretrained.safetensors")))
    theta0 = torch.load(os.path.join(folder, "zeroshot.pt"), weights_only=True)
    vision = {k: v for k, v in clip.state_dict().items() if k.startswith("visual.")}
    assert all(torch.equal(theta0["model." + k], v) for k, v in vision.items())
    for task in manifest["tasks"]:
        data = get_embedded_task(task, data_dir, micro=True)
        expected = build_zeroshot_head(clip, get_tokenizer(TINY_MODEL), data.classnames, data.templates)
        head = torch.load(os.path.join(folder, f"head_{task}.pt"), weights_only=True)
        torch.testing.assert_close(head["weight"], expected.weight, rtol=0, atol=1e-5)


def test_experts_change_only_the_vision_tower(micro):
    _, folder, manifest = micro
    theta0 = torch.load(os.path.join(folder, "zeroshot.pt"), weights_only=True)
    for task in manifest["tasks"]:
        expert = torch.load(os.path.join(folder, task, "finetuned.pt"), weights_only=True)
        tau = {k: expert[k] - theta0[k] for k in theta0}
        text_side = [k for k in tau if not k.startswith("model.visual.")]
        assert text_side and all(torch.count_nonzero(tau[k]) == 0 for k in text_side)
        assert any(torch.count_nonzero(tau[k]) > 0 for k in tau if k.startswith("model.visual."))


def _split(dataset):
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    return x, torch.tensor([dataset[i][1] for i in range(len(dataset))])


def test_experts_beat_zeroshot_through_the_eval_transform(micro, data_dir):
    """Accuracies recomputed through the PIL eval transform (not the preloaded tensors) agree with
    the manifest. Every expert fits its own training data better than zero-shot (lower
    cross-entropy: what fine-tuning optimises) and on average the experts beat zero-shot on the
    test splits. The micro recipe trains seconds on ~90 images per task and its text tower barely
    tells the class names apart, so a single task's test accuracy may tie; accuracies are
    calibrated on the full build (its manifest)."""
    _, folder, manifest = micro
    theta0 = torch.load(os.path.join(folder, "zeroshot.pt"), weights_only=True)
    gains = []
    for task in manifest["tasks"]:
        x, y = _split(get_embedded_task(task, data_dir, eval_transform(32), micro=True).test)
        x_train, y_train = _split(get_embedded_task(task + "Val", data_dir, eval_transform(32),
                                                    micro=True).train)
        head = ClassificationHead.from_state_dict(
            torch.load(os.path.join(folder, f"head_{task}.pt"), weights_only=True))
        expert = torch.load(os.path.join(folder, task, "finetuned.pt"), weights_only=True)
        enc0, enc1 = build_image_encoder(TINY_MODEL, theta0), build_image_encoder(TINY_MODEL, expert)
        acc0, acc1 = eb._evaluate(enc0, head, x, y), eb._evaluate(enc1, head, x, y)
        assert acc0 == pytest.approx(manifest["accuracy"]["zeroshot"][task], abs=1e-4)
        assert acc1 == pytest.approx(manifest["accuracy"]["finetuned"][task], abs=1e-4)
        with torch.no_grad():
            loss0 = torch.nn.functional.cross_entropy(head(enc0(x_train)), y_train)
            loss1 = torch.nn.functional.cross_entropy(head(enc1(x_train)), y_train)
        assert loss1 < loss0, task
        gains.append(acc1 - acc0)
    assert sum(gains) > 0


def test_preloaded_tensors_equal_the_eval_transform(data_dir):
    task = get_embedded_task("DigitsVal", data_dir, eval_transform(32), micro=True)
    x, y = eb.dataset_tensors(task.train, 32)
    for i in (0, 7, len(y) - 1):
        img, label = task.train[i]
        assert torch.equal(x[i], img) and int(y[i]) == label


def test_second_call_reuses_the_cache(micro, data_dir, monkeypatch):
    ckpt, folder, _ = micro
    before = _files(folder)
    monkeypatch.setattr(eb, "build_benchmark", lambda *a, **k: pytest.fail("rebuilt a complete build"))
    assert eb.ensure_embedded_benchmark(ckpt, data_dir, micro=True, progress=False) == folder
    assert _files(folder) == before


def test_changed_recipe_rebuilds_only_what_depends_on_it(micro, data_dir, tmp_path):
    _, folder, manifest = micro
    ckpt = str(tmp_path)
    shutil.copytree(folder, os.path.join(ckpt, eb.MICRO_MODEL))
    copied = os.path.join(ckpt, eb.MICRO_MODEL)
    before = _files(copied)
    # Learned coefficients stay: they record the expert digests they came from, which this rebuild
    # changes, so coefficients="auto" no longer matches them (tests/test_run_cache_keys.py).
    os.makedirs(os.path.join(copied, "adamerging"))
    with open(os.path.join(copied, "adamerging", "lw_adamerging_0123.json"), "w") as f:
        f.write("{}")
    recipe = copy.deepcopy(eb.MICRO_RECIPE)
    recipe["finetune"]["steps"] = 3
    eb.ensure_embedded_benchmark(ckpt, data_dir, micro=True, progress=False, recipe=recipe)
    assert os.path.exists(os.path.join(copied, "adamerging", "lw_adamerging_0123.json"))
    after = _files(copied)
    new = json.loads(after["manifest.json"])
    assert new["recipe_hash"] != manifest["recipe_hash"] and new["recipe"] == recipe
    assert after["clip_pretrained.safetensors"] == before["clip_pretrained.safetensors"]
    assert all(after[f"{t}/finetuned.pt"] != before[f"{t}/finetuned.pt"] for t in new["tasks"])


def test_interrupted_build_resumes(data_dir, tmp_path):
    folder = eb.ensure_embedded_benchmark(str(tmp_path), data_dir, micro=True, progress=False,
                                          recipe=TOY_RECIPE)
    manifest = json.load(open(os.path.join(folder, "manifest.json")))
    done = _files(folder)
    # As if killed while fine-tuning the last task: no manifest, its expert not written yet.
    last = manifest["tasks"][-1]
    os.remove(os.path.join(folder, "manifest.json"))
    os.remove(os.path.join(folder, last, "finetuned.pt"))
    eb.ensure_embedded_benchmark(str(tmp_path), data_dir, micro=True, progress=False, recipe=TOY_RECIPE)
    redone = _files(folder)
    # deterministic: the redone expert has the same bytes; the manifest differs only in timings
    assert {k: v for k, v in redone.items() if k != "manifest.json"} == \
        {k: v for k, v in done.items() if k != "manifest.json"}
    untimed = [{k: v for k, v in json.loads(f["manifest.json"]).items() if k != "build_seconds"}
               for f in (redone, done)]
    assert untimed[0] == untimed[1]


def test_build_is_deterministic(data_dir, tmp_path):
    a = eb.ensure_embedded_benchmark(str(tmp_path / "a"), data_dir, micro=True, progress=False,
                                     recipe=TOY_RECIPE)
    b = eb.ensure_embedded_benchmark(str(tmp_path / "b"), data_dir, micro=True, progress=False,
                                     recipe=TOY_RECIPE)
    fa, fb = _files(a), _files(b)
    timing_free = [k for k in fa if k != "manifest.json"]
    assert set(fa) == set(fb) and all(fa[k] == fb[k] for k in timing_free)
    ma, mb = json.loads(fa["manifest.json"]), json.loads(fb["manifest.json"])
    assert ma["accuracy"] == mb["accuracy"] and ma["recipe_hash"] == mb["recipe_hash"]


def test_missing_data_package_drops_its_task(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(embedded_sources, "FASHION_MNIST_DIR", str(tmp_path / "absent"))
    # in this process (pinned=False): a pinned child would not see the patched package folder
    folder = eb.ensure_embedded_benchmark(str(tmp_path / "ck"), str(tmp_path / "data"), micro=True,
                                          progress=True, recipe=TOY_RECIPE, pinned=False)
    manifest = json.load(open(os.path.join(folder, "manifest.json")))
    assert "Fashion" not in manifest["tasks"] and "Digits" in manifest["tasks"]
    captured = capsys.readouterr()
    assert "dataset-fashion-mnist" in captured.out + captured.err


def test_encode_captions_equals_encode_text():
    torch.manual_seed(0)
    clip = create_clip(TINY_MODEL)
    tokens = get_tokenizer(TINY_MODEL)(["a photo of a 3.", "a", "a photo of a 3.",
                                        "a much longer caption about a zebra.", "a"])
    torch.testing.assert_close(encode_captions(clip, tokens, buckets=2), clip.encode_text(tokens),
                               rtol=0, atol=1e-5)


def test_tiny_vocabulary_is_every_embedded_caption_token():
    # the shipped vocabulary must follow the tasks' class names and templates when they change
    from taskmerge.embedded.tasks import caption_texts
    from taskmerge.models.tokenizers import PrunedBPETokenizer, tiny_vocabulary_path
    with open(tiny_vocabulary_path()) as f:
        shipped = json.load(f)["bpe_ids"]
    assert shipped == PrunedBPETokenizer.vocabulary(caption_texts())
    tokenizer = get_tokenizer(TINY_MODEL)
    assert tokenizer.vocab_size == create_clip(TINY_MODEL).token_embedding.num_embeddings
    longest = max(int((tokenizer(t) != 0).sum()) for t in caption_texts())
    assert longest <= tokenizer.context_length  # no caption of a task is cut


def test_pruned_bpe_tokenizer_renumbers_clips_own_tokens():
    import open_clip
    tokenizer = get_tokenizer(TINY_MODEL)
    texts = ["a photo of a sneaker.", 'a blurry photo of the number: "7".', "a zebra"]
    got = tokenizer(texts)
    clip_ids = open_clip.tokenize(texts, context_length=tokenizer.context_length)
    back = {new: old for old, new in tokenizer.ids.items()}
    back.update({0: 0, tokenizer.sot: int(clip_ids[0, 0])})
    back[tokenizer.eot] = int(clip_ids[0].max())  # CLIP's end of text is its largest id too
    assert torch.equal(got.apply_(lambda i: back[i]), clip_ids)
    assert int(tokenizer(texts).max()) == tokenizer.eot == tokenizer.vocab_size - 1


def test_pruned_bpe_tokenizer_unknown_words_and_cut():
    tokenizer = get_tokenizer(TINY_MODEL)
    (row,) = tokenizer(["a photo of a quokka."])
    assert tokenizer.unknown in row.tolist()  # "quokka" is no caption's word
    (long,) = tokenizer(["a photo of a " + "dog " * 40])
    assert int(long[0]) == tokenizer.sot and int(long[-1]) == tokenizer.eot and bool((long != 0).all())


def test_partner_classes_form_one_cycle_per_task():
    partner = partner_classes([4, 1, 3], torch.Generator().manual_seed(0))
    assert partner[4] == 4  # a one-class task has no other class to name
    for start, k in ((0, 4), (5, 3)):
        block = partner[start:start + k] - start
        assert sorted(block.tolist()) == list(range(k)) and torch.all(block != torch.arange(k))
        c, seen = 0, set()  # following partners from any class visits the whole task once
        while c not in seen:
            seen.add(c)
            c = int(block[c])
        assert len(seen) == k


def test_caption_noise_names_the_partner_class():
    captions = torch.arange(5 * 2).view(5, 2, 1)  # caption id = 2·class + template
    partner = torch.tensor([1, 2, 0, 4, 3])
    corpus = CaptionedImages(images=torch.zeros(5, 3, 2, 2), labels=torch.arange(5),
                             captions=captions, num_templates=torch.tensor([2, 2, 2, 1, 1]),
                             partner=partner)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(5).repeat(400)
    clean = corpus.sample_captions(labels, 0.0, g).view(-1)
    assert torch.equal(clean // 2, labels)
    assert set(clean[labels == 0].tolist()) == {0, 1} and set(clean[labels == 3].tolist()) == {6}
    noisy = corpus.sample_captions(labels, 1.0, g).view(-1) // 2
    assert torch.equal(noisy, partner[labels])
    half = corpus.sample_captions(labels, 0.5, g).view(-1) // 2
    assert 0.4 < (half != labels).float().mean() < 0.6


def test_random_resized_crop_full_crop_is_identity():
    x = torch.randn(4, 3, 8, 8)
    g = torch.Generator().manual_seed(0)
    torch.testing.assert_close(random_resized_crop(x, g, scale=(1.0, 1.0), ratio=(1.0, 1.0)), x,
                               rtol=0, atol=1e-5)
    y = random_resized_crop(x, g, scale=(0.5, 0.6))
    assert y.shape == x.shape and not torch.allclose(y, x)


def test_cosine_lr_schedule():
    lrs = [cosine_lr(s, 1.0, 10, 110) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.5) and lrs[-1] < 1e-3
    assert np.all(np.diff(lrs[10:]) <= 0)
