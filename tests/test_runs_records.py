"""The 2025 records (Iso-C/CTS, WUDI, CART) and DARE / PCB wired to scripts, Surgery and reports: each
script end to end on the micro embedded benchmark, each new base once through Surgery, Iso's α search
on a hand-made curve, and what reaches a Surgery identity. The merge math has its own tests
(test_merging_records.py, test_merging_dare_pcb.py)."""
import dataclasses
import types

import pytest
import torch
from safetensors.torch import load_file
from script_variables import script_config
from test_fusionbench_family import TASKS as HF_TASKS
from test_fusionbench_family import download_root  # noqa: F401 (a fixture)

from taskmerge import merging
from taskmerge.merging.iso import iso_c_key
from taskmerge.runs.adaptive import base_identity, run_surgery
from taskmerge.runs.adaptive import base_settings
from taskmerge.runs.data_free import attention_layout, run_data_free
from taskmerge.runs.methods.cart_merging import cart_settings
from taskmerge.runs.methods.wudi_merging import wudi_settings
from taskmerge.runs.reporting import method_label
from taskmerge.runs.selection import select_coefficient
from taskmerge.runs.setup import resolve_setup
from taskmerge.storage.checkpoints import CheckpointSet
from taskmerge.storage.errors import ConfigError

MODEL = "taskmerge-tiny-micro"


@pytest.fixture(scope="module")
def config(micro_benchmark, tmp_path_factory):
    ckpt, data = micro_benchmark
    out = tmp_path_factory.mktemp("records")
    return {"model_name": MODEL, "checkpoint_dir": ckpt, "data_location": data,
            "log_dir": str(out / "logs"), "save_dir": str(out / "merged")}


@pytest.fixture(scope="module")
def experts(config):
    setup = resolve_setup(MODEL, config["checkpoint_dir"], config["data_location"])
    ckpt = setup.checkpoints
    return ckpt.pretrained(), {t: ckpt.finetuned(t) for t in setup.tasks}


def _run(config, script, **settings):
    return run_data_free(script_config(script, **config, **settings), script=script)


def _saved(report):
    return load_file(report["merged_file"])


def _assert_same_model(saved, expected):
    assert set(saved) == set(expected)
    for key, value in expected.items():
        assert torch.equal(saved[key], value), key


# --- each script end to end: the saved model is the merge function's, the label names the settings
@pytest.mark.parametrize("script,settings,label,merge", [
    ("main_IsoMerging.py", {"method": "iso_cts", "select_on_val": False, "alpha": 1.5},
     "iso_cts (f 0.8, α 1.5)", lambda p, e: merging.iso_merging(p, e, 1.5, "iso_cts", 0.8)),
    ("main_WUDIMerging.py", {"wudi_steps": 20},
     "wudi_merging (original, Adam 20 steps)", lambda p, e: merging.wudi_merging(p, e, "adam", 20)),
    # FusionBench's preset is FusionBench's merge: q, k, v apart, on every family (qkv="auto")
    ("main_WUDIMerging.py", {"wudi_solver": "closed_form", "wudi_preset": "fusionbench"},
     "wudi_merging (fusionbench, closed form, separate q/k/v)",
     lambda p, e: merging.wudi_merging(p, e, "closed_form", keys="all_2d", others="mean", qkv="separate")),
    ("main_WUDIMerging.py", {"wudi_solver": "closed_form", "wudi_preset": "fusionbench", "qkv": "fused"},
     "wudi_merging (fusionbench, closed form)",
     lambda p, e: merging.wudi_merging(p, e, "closed_form", keys="all_2d", others="mean")),
    ("main_CARTMerging.py", {}, "cart_merging (λ 2.0, ρ 0.12)",
     lambda p, e: merging.cart_merging(p, e, 2.0, 0.12)),
    ("main_CARTMerging.py", {"cart_preset": 20, "cart_lambda": 0.5}, "cart_merging (λ 0.5, ρ 0.32)",
     lambda p, e: merging.cart_merging(p, e, 0.5, 0.32)),
    ("main_PCBMerging.py", {}, "pcb_merging (pcb_ES balancing, fixed λ 1.2, r 0.05)",
     lambda p, e: merging.pcb_merging(p, e)),
    ("main_TaskArithmetic.py", {"dare_p": 0.5}, "task_arithmetic (DARE p 0.5, λ 0.3)",
     lambda p, e: merging.dare_task_arithmetic(p, e, 0.5, 0.3, seed=0)),
    ("main_TiesMerging.py", {"dare_p": 0.3, "dare_seed": 4, "scaling_coef": 0.5},
     "ties_merging (DARE p 0.3, dis-sum, K 0.2, λ 0.5)",
     lambda p, e: merging.dare_ties(p, e, 0.3, 0.5, 0.2, "dis-sum", seed=4)),
])
def test_script_runs_saves_its_merge_and_labels_it(config, experts, script, settings, label, merge):
    report = _run(config, script, **settings)
    assert set(report["accuracy"]) == set(report["tasks"]) and report["average_accuracy"] > 0
    assert method_label(report) == label
    _assert_same_model(_saved(report), merge(*experts))


def test_iso_c_chooses_alpha_on_val_with_early_stopping(config, experts):
    report = _run(config, "main_IsoMerging.py")
    curve = report["val_curve"]
    evaluated = [float(a) for a in curve]
    assert evaluated == merging.ISO_ALPHA_GRID[:len(evaluated)]
    normalized = [curve[str(a)]["avg_normalized_val_accuracy"] for a in evaluated]
    assert report["alpha"] == evaluated[normalized.index(max(normalized))]
    assert method_label(report) == f"iso_c (α {report['alpha']} on val)"
    _assert_same_model(_saved(report), merging.iso_merging(*experts, report["alpha"], "iso_c"))


def test_dare_at_p_zero_is_the_plain_method_name_and_settings_included(config):
    plain = _run(config, "main_TaskArithmetic.py")
    assert "dare" not in plain and plain["merge"] == "task_arithmetic_0.3"
    assert method_label(plain) == "task_arithmetic (λ 0.3)"


def test_pcb_searches_one_lambda_per_task_on_val_as_pcb_es_and_saves_that_merge(config, experts):
    settings = {"pcb_search": True, "pcb_search_budget": 4, "pcb_search_seed": 1}
    report = _run(config, "main_PCBMerging.py", **settings)
    pcb, tasks = report["pcb"], report["tasks"]
    assert list(pcb["lams"]) == tasks and all(0.8 <= v <= 1.3 for v in pcb["lams"].values())
    curve = report["val_curve"]
    assert len(curve) == 4 and curve[0]["lams"] == [1.0] * len(tasks)
    best = max(c["avg_val_accuracy"] for c in curve)
    assert next(c for c in curve if c["avg_val_accuracy"] == best)["lams"] == list(pcb["lams"].values())
    assert method_label(report) == "pcb_merging (pcb_ES balancing, λ_t searched on val (4 merges), r 0.05)"
    _assert_same_model(_saved(report), merging.pcb_merging(*experts, lams=list(pcb["lams"].values())))
    again = _run(config, "main_PCBMerging.py", **settings)
    assert again["pcb"]["lams"] == pcb["lams"]  # seeded: the same search


# --- each new base once through Surgery: step 0 is the base's own accuracy
@pytest.mark.parametrize("method_name,settings,data_free", [
    ("iso_c", {"alpha": 1.2, "select_on_val": False}, ("main_IsoMerging.py", {"alpha": 1.2, "select_on_val": False})),
    ("iso_cts", {"select_on_val": False}, ("main_IsoMerging.py", {"method": "iso_cts", "alpha": 1.0, "select_on_val": False})),
    ("wudi_merging", {"wudi_solver": "closed_form"}, ("main_WUDIMerging.py", {"wudi_solver": "closed_form"})),
    ("cart_merging", {}, ("main_CARTMerging.py", {})),
    ("pcb_merging", {}, ("main_PCBMerging.py", {})),
    ("task_arithmetic", {"dare_p": 0.5}, ("main_TaskArithmetic.py", {"dare_p": 0.5})),
])
def test_new_base_goes_through_surgery_from_its_own_accuracy(config, method_name, settings, data_free):
    script, base_settings = data_free
    base = _run(config, script, **base_settings)
    report = run_surgery(script_config("main_Surgery.py", **{**config, "save_dir": ""},
                                       resume_dir="", method_name=method_name, iterations=2,
                                       eval_iterations=2, rank=2, **settings), script="surgery.py")
    assert report["base_accuracy"] == pytest.approx(base["accuracy"])
    assert method_label(report) == method_label(base) + " + Surgery v1"


def test_surgery_v2_on_an_iso_base(config):
    report = run_surgery(script_config("main_Surgery.py", **{**config, "save_dir": ""},
                                       resume_dir="", method_name="iso_cts", select_on_val=False, surgery="v2", iterations=2,
                                       eval_iterations=2, rank=2), script="surgery.py")
    assert method_label(report) == "iso_cts (f 0.8, α 1.0) + SurgeryV2"


# --- what a Surgery base's identity (its cache and resume keys) holds
def _identity(method_name, **settings):
    config = script_config("main_Surgery.py", method_name=method_name, **settings)
    method, merge_settings = base_settings(config)
    name = method.name
    extra = {"wudi_merging": lambda s: {"wudi": wudi_settings(s)},
             "cart_merging": lambda s: {"cart": cart_settings(s, 8)[1]}}[name](merge_settings)
    return base_identity(method_name, {"base": name, **extra})


def test_surgery_identity_changes_with_the_new_bases_settings():
    adam = _identity("wudi_merging")
    assert adam != _identity("wudi_merging", wudi_steps=10)
    assert adam != _identity("wudi_merging", wudi_solver="closed_form")
    assert _identity("wudi_merging", wudi_solver="closed_form") != _identity(
        "wudi_merging", wudi_solver="closed_form", wudi_ridge=1e-3)
    # Adam's step count and lr do not enter a closed-form merge, nor its identity
    assert _identity("wudi_merging", wudi_solver="closed_form") == _identity(
        "wudi_merging", wudi_solver="closed_form", wudi_steps=10, wudi_lr=1.0)
    assert _identity("cart_merging") != _identity("cart_merging", cart_lambda=1.0)


def test_surgery_scripts_refuse_a_bad_setting_of_a_new_base():
    with pytest.raises(ConfigError, match="wudi_ridge=0.1"):
        script_config("main_Surgery.py", method_name="wudi_merging", wudi_ridge=0.1)
    with pytest.raises(ConfigError, match="dare_p=1.0"):
        script_config("main_TaskArithmetic_with_surgery.py", dare_p=1.0)
    with pytest.raises(ConfigError, match="cart_preset=9"):
        script_config("main_CARTMerging.py", cart_preset=9)


def test_cart_preset_nearest_the_number_of_tasks():
    s = script_config("main_CARTMerging.py")
    assert [cart_settings(s, t)[1]["preset"] for t in (3, 8, 11, 12, 14, 17, 18, 30)] == \
        [8, 8, 8, 14, 14, 14, 20, 20]
    assert cart_settings(dataclasses.replace(s, cart_rank_ratio=0.5), 14)[1] == \
        {"preset": 14, "lam": 1.5, "rank_ratio": 0.5}


# --- Iso's α search: early stopping on the absolute mean, choice on the normalized one
def _curve_search(absolute_by_alpha, individual, patience=3):
    """select_coefficient over a fake merge whose val accuracies are given per α."""
    grid = list(absolute_by_alpha)
    evaluated = []

    def evaluate_val(alpha):
        evaluated.append(alpha)
        return dict(absolute_by_alpha[alpha])

    best, curve = select_coefficient(grid, lambda a: a, evaluate_val, individual, lambda _: None, patience)
    return best, evaluated


def test_iso_search_stops_after_three_without_a_higher_absolute_mean():
    individual = {"A": 1.0, "B": 1.0}
    accs = {0.1: (0.5, 0.5), 0.2: (0.6, 0.6), 0.3: (0.6, 0.6), 0.4: (0.55, 0.6), 0.5: (0.6, 0.5),
            0.6: (0.9, 0.9)}
    best, evaluated = _curve_search({a: dict(zip("AB", v)) for a, v in accs.items()}, individual)
    assert evaluated == [0.1, 0.2, 0.3, 0.4, 0.5]  # 0.3 ties 0.2 (not higher): a miss; 0.6 never seen
    assert best == 0.2  # ties go to the smallest α
    _, everything = _curve_search({a: dict(zip("AB", v)) for a, v in accs.items()}, individual, None)
    assert everything == list(accs)  # without patience: the whole grid (the TSV / tall_masks rule)


def test_iso_search_chooses_by_normalized_while_it_stops_by_absolute():
    # task B's expert is weak on val: a gain on B weighs more normalized than absolute (dyadic
    # accuracies, so that the ties below are exact)
    individual = {"A": 1.0, "B": 0.5}
    accs = {0.1: (0.75, 0.25), 0.2: (0.625, 0.3125), 0.3: (0.5, 0.25), 0.4: (0.5, 0.25), 0.5: (1.0, 0.5)}
    best, evaluated = _curve_search({a: dict(zip("AB", v)) for a, v in accs.items()}, individual)
    # absolute means 0.5, 0.46875, 0.375, 0.375: no gain after 0.1, so the sweep ends at 0.4
    assert evaluated == [0.1, 0.2, 0.3, 0.4]
    # normalized means 0.625, 0.625, 0.5, 0.5: 0.1 and 0.2 tie, the first wins
    assert best == 0.1
    accs[0.2] = (0.625, 0.375)  # absolute 0.5: no gain, a miss; normalized 0.6875: the best
    best, evaluated = _curve_search({a: dict(zip("AB", v)) for a, v in accs.items()}, individual)
    assert evaluated == [0.1, 0.2, 0.3, 0.4] and best == 0.2


# --- HF checkpoints: q/k/v reach the matrix methods as the fused in_proj (concatenate → merge → split),
# or, with qkv="separate" (the default on this family), as FusionBench's three matrices
@pytest.mark.parametrize("qkv", ["fused", "separate"])
def test_iso_on_hf_checkpoints_merges_q_k_v_fused_or_as_fusionbench_does(download_root, qkv):  # noqa: F811
    root, clip, hf_experts = download_root
    ckpt = CheckpointSet.discover(root, "ViT-B-32", HF_TASKS, family="fusionbench")
    theta0 = ckpt.pretrained()
    delta = merging.iso_delta(theta0, {t: ckpt.finetuned(t) for t in HF_TASKS}, "iso_c", qkv=qkv)
    assert not any("q_proj" in k or "k_proj" in k or "v_proj" in k for k in delta)
    tower = lambda m: getattr(m, "vision_model", m)  # noqa: E731
    base = tower(clip).state_dict()
    for layer in range(clip.config.vision_config.num_hidden_layers):
        names = [f"encoder.layers.{layer}.self_attn.{p}_proj.weight" for p in "qkv"]
        blocks = [sum(tower(e).state_dict()[n] - base[n] for e in hf_experts.values()) for n in names]
        merged = delta[f"model.visual.transformer.resblocks.{layer}.attn.in_proj_weight"]
        fused = iso_c_key(torch.cat(blocks))  # concatenate q, k, v in that order, merge, split
        split = torch.cat([iso_c_key(b) for b in blocks])  # FusionBench's three separate merges
        assert not torch.allclose(fused, split, atol=1e-4)
        assert torch.allclose(merged, fused if qkv == "fused" else split, atol=1e-6)


def test_the_log_says_how_in_proj_was_merged():
    run = types.SimpleNamespace(setup=types.SimpleNamespace(family="fusionbench"))
    assert "q/k/v concatenated from the HF checkpoint" in attention_layout(run, "fused")
    assert "FusionBench merges its CLIPVisionModel's q_proj" in attention_layout(run, "separate")
    run.setup.family = "embedded"
    assert "open_clip's in_proj_weight" in attention_layout(run, "fused")
