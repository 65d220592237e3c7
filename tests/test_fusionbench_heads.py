"""The fusionbench family's heads (issue #18 §1, §4): built from FusionBench's class names in both
data formats, with tokens equal to transformers' CLIPTokenizer's; the head cache keyed by what
built it (names, templates, text tower, tokenizer); key-less heads kept for the other families;
rank 0 builds first under torchrun."""
from __future__ import annotations

import json
import os
import zlib

import pytest
import torch
from tall_trees import make_folders, make_parquet
from test_fusionbench_family import stand_in_backbone
from test_hf_checkpoints import _randomise, tiny_config

from taskmerge.datasets import templates
from taskmerge.datasets.fusionbench_classnames import CLASSNAMES, SOURCE_FILES, TEMPLATES, fusionbench_prompts
from taskmerge.datasets.parquet import DATA_NAMED, HF_SOURCES, num_classes
from taskmerge.datasets.real import DatasetLayoutError
from taskmerge.models.encoders import ImageEncoder
from taskmerge.models.heads import ClassificationHead
from taskmerge.models.hf_encoders import create_clip_from_config
from taskmerge.runs import heads as run_heads
from taskmerge.runs import setup as run_setup
from taskmerge.storage.hf_checkpoints import FUSIONBENCH_TASK_NAMES, open_clip_config

TASKS = ["KMNIST", "FER2013", "Cars"]


# ---------------------------------------------------------------- the table and the tokens
def test_table_covers_fusionbench_tasks_with_our_counts_and_templates():
    assert set(CLASSNAMES) == set(TEMPLATES) == set(SOURCE_FILES) == set(FUSIONBENCH_TASK_NAMES)
    for task, names in CLASSNAMES.items():
        assert len(names) == num_classes(task), task
        assert TEMPLATES[task] == templates.get_templates(task), task  # FusionBench's = ours
    names, _, source = fusionbench_prompts("KMNISTVal")
    assert names == list("おきすつなはまやれを") and source.endswith("clip_classification/kmnist.py")
    assert CLASSNAMES["FER2013"][3] == "happy" and CLASSNAMES["Flowers102"][92] == "ball moss"
    with pytest.raises(DatasetLayoutError, match="no class names for 'EMNIST'"):
        fusionbench_prompts("EMNIST")


def _hf_tokenizer_from_open_clip_vocab():
    """transformers' CLIPTokenizer over the vocabulary and merges of open_clip's shipped BPE file,
    the ones openai/clip-vit-*'s vocab.json and merges.txt hold (offline: no hub download)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer
    bpe = SimpleTokenizer()
    special = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {special.get(k, k): v for k, v in bpe.encoder.items()}
    merges = [pair for pair, _ in sorted(bpe.bpe_ranks.items(), key=lambda kv: kv[1])]
    return CLIPTokenizer(vocab=vocab, merges=merges)


def test_open_clip_tokens_equal_clip_tokenizers_for_every_fusionbench_prompt():
    import open_clip
    hf, ours = _hf_tokenizer_from_open_clip_vocab(), open_clip.get_tokenizer("ViT-B-32")
    assert hf("a photo of a cat.")["input_ids"][0] == 49406 and hf.eos_token_id == 49407
    checked = 0
    for task in CLASSNAMES:
        for name in CLASSNAMES[task]:
            texts = [t.format(c=name) for t in TEMPLATES[task]]
            # FusionBench: processor(text=texts, padding=True), padded with <|endoftext|>
            theirs = hf(texts, padding=True)["input_ids"]
            for text, want, got in zip(texts, theirs, ours(texts).tolist()):
                want = want[: want.index(49407) + 1]
                assert got[: len(want)] == want and not any(got[len(want):]), (task, text)
                checked += 1
    assert checked == sum(len(CLASSNAMES[t]) * len(TEMPLATES[t]) for t in CLASSNAMES)
    # the hiragana are real tokens, one name's ids never another's (romaji shared none of them)
    kana = [tuple(ours([f"a photo of the character {c}."])[0, 5:8].tolist()) for c in CLASSNAMES["KMNIST"]]
    assert len(set(kana)) == 10


# ---------------------------------------------------------------- a tiny FusionBench download
class TinyTokenizer:
    """Stands in for CLIP's BPE on the tiny text tower (100 ids, 16 positions): a word's id is its
    crc32 mod 97, so every name gets its own ids; 98 starts, 99 (the largest) ends the text."""
    context_length = 16

    def __call__(self, texts):
        out = torch.zeros(len(texts), self.context_length, dtype=torch.long)
        for i, text in enumerate(texts):
            ids = [1 + zlib.crc32(w.encode()) % 97 for w in text.lower().split()][-14:]
            out[i, : len(ids) + 2] = torch.tensor([98] + ids + [99])
        return out


@pytest.fixture(scope="module")
def fb_root(tmp_path_factory):
    from transformers import CLIPModel, CLIPVisionModel
    root = tmp_path_factory.mktemp("fb")
    make_parquet(str(root / "parquet"), TASKS)
    make_folders(str(root / "folders"), ["KMNIST", "FER2013"])
    clip = CLIPModel(tiny_config("quick_gelu")).eval()
    _randomise(clip, 1)
    clip.save_pretrained(root / "openai" / "clip-vit-base-patch32")
    for task in TASKS:
        vision = CLIPVisionModel(clip.config.vision_config).eval()
        _randomise(vision, 3)
        vision.save_pretrained(root / "tanganke" / f"clip-vit-base-patch32_{HF_SOURCES[task].fusionbench}")
    with open(root / "openai" / "clip-vit-base-patch32" / "config.json") as f:
        return root, open_clip_config(json.load(f))


@pytest.fixture
def tiny_towers(fb_root, monkeypatch):
    _, config = fb_root
    def encoder(arch, state_dict=None):
        enc = ImageEncoder(create_clip_from_config(config))
        if state_dict is not None:
            enc.load_state_dict({k: state_dict[k] for k in enc.state_dict()})
        return enc.eval()
    monkeypatch.setattr(run_setup, "build_image_encoder", encoder)
    stand_in_backbone(monkeypatch, config)
    monkeypatch.setattr(run_heads, "create_clip", lambda arch: create_clip_from_config(config))
    monkeypatch.setattr(run_heads, "get_tokenizer", lambda arch: TinyTokenizer())
    built = []
    real = run_heads.build_zeroshot_head
    monkeypatch.setattr(run_heads, "build_zeroshot_head",
                        lambda clip, tok, names, temps, device: built.append(list(names)) or
                        real(clip, tok, names, temps, device=device))
    return built


def _setup(root, data_format, tasks=TASKS):
    return run_setup.resolve_setup("ViT-B-32", str(root), str(root / data_format), list(tasks), data_format)


def _fresh_model_dir(root):
    for f in os.listdir(root / "ViT-B-32") if os.path.isdir(root / "ViT-B-32") else ():
        os.remove(root / "ViT-B-32" / f)


def test_heads_are_built_from_fusionbench_names_in_both_formats(fb_root, tiny_towers):
    root, _ = fb_root
    _fresh_model_dir(root)
    setup = _setup(root, "parquet")
    assert setup.family == "fusionbench" and setup.preprocessing == "transformers CLIPImageProcessor"
    assert setup.describe()["preprocessing"] == "transformers CLIPImageProcessor"
    assert [run_heads.head_prompts(setup, t).classnames for t in TASKS] == [CLASSNAMES[t] for t in TASKS]
    lines = []
    heads = run_heads.load_heads(setup, log=lines.append)
    assert tiny_towers == [CLASSNAMES[t] for t in TASKS] and not lines
    key = json.loads((root / "ViT-B-32" / "head_KMNIST.key.json").read_text())
    assert key["classnames"] == CLASSNAMES["KMNIST"] and key["templates"] == TEMPLATES["KMNIST"]
    assert key["names_from"] == "FusionBench fusion_bench/tasks/clip_classification/kmnist.py"
    assert key["text_tower"] and "open_clip SimpleTokenizer" in key["tokenizer"]
    # the folders format gives the same prompts, so the same cached heads (nothing is rebuilt)
    tiny_towers.clear()
    folders = run_heads.load_heads(_setup(root, "folders", ["KMNIST", "FER2013"]), log=lines.append)
    assert tiny_towers == [] and not lines
    assert torch.equal(folders["KMNIST"].weight, heads["KMNIST"].weight)


def test_a_head_whose_key_differs_is_rebuilt_naming_the_field(fb_root, tiny_towers):
    root, _ = fb_root
    _fresh_model_dir(root)
    setup = _setup(root, "parquet", ["KMNIST"])
    first = run_heads.load_heads(setup)["KMNIST"].weight.clone()
    # a head built by an older taskmerge (or for another family) from the romaji names
    key_file = root / "ViT-B-32" / "head_KMNIST.key.json"
    key = json.loads(key_file.read_text())
    key_file.write_text(json.dumps({**key, "classnames": templates.CLASSNAMES["KMNIST"]}))
    tiny_towers.clear()
    lines = []
    again = run_heads.load_heads(_setup(root, "parquet", ["KMNIST"]), log=lines.append)["KMNIST"]
    assert tiny_towers == [CLASSNAMES["KMNIST"]] and torch.equal(again.weight, first)
    assert len(lines) == 1 and "was built from another classnames" in lines[0] and "kmnist.py" in lines[0]
    # the pre-trained CLIPModel replaced: its text tower's digest differs, the head is rebuilt
    from transformers import CLIPModel
    folder = root / "openai" / "clip-vit-base-patch32"
    clip = CLIPModel.from_pretrained(folder)
    _randomise(clip, 7)
    clip.save_pretrained(folder)
    lines.clear()
    rebuilt = run_heads.load_heads(_setup(root, "parquet", ["KMNIST"]), log=lines.append)["KMNIST"]
    assert len(lines) == 1 and "another text_tower" in lines[0]
    assert not torch.allclose(rebuilt.weight, first)
    # a key-less head on this family is rebuilt, saying so
    os.remove(key_file)
    lines.clear()
    run_heads.load_heads(_setup(root, "parquet", ["KMNIST"]), log=lines.append)
    assert len(lines) == 1 and "has no key" in lines[0] and key_file.exists()


def test_data_in_another_class_order_than_fusionbench_is_refused(fb_root, tiny_towers, monkeypatch):
    root, _ = fb_root
    setup = _setup(root, "parquet", ["Cars"])
    data = run_setup.task_data(setup, "Cars")
    swapped = [CLASSNAMES["Cars"][1], CLASSNAMES["Cars"][0]] + list(data.classnames[2:])
    monkeypatch.setattr(data, "classnames", swapped)
    with pytest.raises(DatasetLayoutError, match="another order than FusionBench.*stanford_cars.py"):
        run_heads.head_prompts(setup, "Cars")


def test_other_families_keep_key_less_heads_and_read_parquet_names_with_spaces(micro_benchmark):
    """The released heads of task_vectors / tall_masks (and the embedded build's) carry no key and
    are used as they are; parquet names of data-named tasks read '_' as a space for these families."""
    ckpt, data = micro_benchmark
    setup = run_setup.resolve_setup("taskmerge-tiny-micro", ckpt, data)
    path = setup.checkpoints.head_path(setup.tasks[0])
    assert not os.path.exists(run_heads.key_path(path))
    before = os.path.getmtime(path)
    heads = run_heads.load_heads(setup, log=pytest.fail)
    assert os.path.getmtime(path) == before and not os.path.exists(run_heads.key_path(path))
    stored = torch.load(path, weights_only=True)
    assert torch.equal(heads[setup.tasks[0]].weight, stored["weight"].float())
    assert setup.preprocessing == "open_clip" and setup.describe()["preprocessing"] == "open_clip"
    # a task_vectors family on parquet data: the dataset's "name_0_x" is prompted as "name 0 x"
    fake = run_setup.Setup("ViT-B-32", "ViT-B-32", setup.checkpoints, ["Cars"], data, False,
                           data_format="parquet")
    fake._data_cache[("Cars", "test")] = type(
        "Data", (), {"classnames": ["name_0_x"] * DATA_NAMED["Cars"], "templates": ["{c}"],
                     "info": {"format": "parquet"}})()
    prompts = run_heads.head_prompts(fake, "Cars")
    assert prompts.classnames[0] == "name 0 x" and "'_' → ' '" in prompts.source


def test_rank0_builds_first_and_the_others_load(fb_root, tiny_towers, monkeypatch):
    from taskmerge.compute import distributed
    root, _ = fb_root
    _fresh_model_dir(root)
    events = []
    monkeypatch.setattr(distributed, "barrier", lambda: events.append("barrier"))
    real_build = run_heads._build_and_cache_head
    monkeypatch.setattr(run_heads, "_build_and_cache_head",
                        lambda *a, **k: events.append("build") or real_build(*a, **k))
    monkeypatch.setattr(distributed, "is_main", lambda: True)
    run_heads.load_heads(_setup(root, "parquet", ["KMNIST", "FER2013"]))
    assert events == ["build", "build", "barrier"]  # rank 0: builds, then releases the others
    events.clear()
    monkeypatch.setattr(distributed, "is_main", lambda: False)
    heads = run_heads.load_heads(_setup(root, "parquet", ["KMNIST", "FER2013"]))
    assert events == ["barrier"]  # another rank: waits for rank 0, then loads what it wrote
    assert all(isinstance(h, ClassificationHead) for h in heads.values())


def test_a_rebuilt_embedded_head_equals_the_built_one_and_a_gone_text_tower_is_said(micro_benchmark, tmp_path):
    import shutil
    from taskmerge.storage.checkpoints import CheckpointError
    ckpt, data = micro_benchmark
    copy = tmp_path / "checkpoints"
    shutil.copytree(ckpt, copy)
    setup = run_setup.resolve_setup("taskmerge-tiny-micro", str(copy), data)
    task = setup.tasks[0]
    path = setup.checkpoints.head_path(task)
    built = torch.load(path, weights_only=True)["weight"]
    os.remove(path)
    lines = []
    rebuilt = run_heads.load_heads(setup, log=lines.append)[task]
    # the same head the embedded build wrote, up to rounding: the build ran on the pinned CPU paths
    # (compute/cpu_paths.py), this test process on the native ones
    torch.testing.assert_close(rebuilt.weight, built, rtol=1e-5, atol=1e-6)
    assert not lines
    key = json.loads(open(run_heads.key_path(path)).read())
    assert key["text_tower"] and key["tokenizer"].startswith("taskmerge pruned BPE")
    tower = run_heads.text_tower_path(setup)
    os.rename(tower, tower + ".moved")
    again = run_heads.load_heads(setup, log=lines.append)[task]
    assert torch.equal(again.weight, rebuilt.weight) and len(lines) == 1 and "no longer" in lines[0]
    with open(run_heads.key_path(path), "w") as f:
        json.dump({**key, "templates": ["{c}"]}, f)
    with pytest.raises(CheckpointError, match="built from other inputs"):
        run_heads.load_heads(setup, log=lines.append)
