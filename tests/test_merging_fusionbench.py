"""What FusionBench's merges see on its own checkpoint family (issue #18 §3): the global quantiles of
TIES, DARE+TIES and PCB over its CLIPVisionModel's keys only, and attention's q, k, v as three
tensors (`qkv="separate"`) for Iso-C/CTS, WUDI, TSV-M and EMR's per-tensor means; the fused mode
and the whole key set stay the originals'. Plus PCB's λ search (pcb_ES.py's, seeded)."""
import types

import numpy as np
import pytest
import torch
from test_hf_checkpoints import _randomise, tiny_config
from transformers import CLIPModel, CLIPVisionModel
from vit_toys import vit_like, vit_shapes

from taskmerge import merging
from taskmerge.merging.task_vectors import row_blocks
from taskmerge.merging.ties import trim_thresholds
from taskmerge.runs.data_free import flattened_keys, qkv_mode
import taskmerge.runs.methods  # noqa: F401 (declares the built-in methods: their labels)
from taskmerge.runs.reporting import method_label
from taskmerge.runs.selection import search_coefficients
from taskmerge.storage.hf_checkpoints import convert_image_encoder, vision_model_keys

# the toy's vision tower as a CLIPVisionModel has it: no projection, no text leftovers
VISION = [k for k in vit_shapes() if k != "model.visual.proj"]


def assert_same(a: dict, b: dict, atol: float = 0.0):
    assert set(a) == set(b)
    for key in a:
        if atol:
            assert torch.allclose(a[key], b[key], atol=atol), key
        else:
            assert torch.equal(a[key], b[key]), key


def only(state_dict: dict, keys) -> dict:
    return {k: state_dict[k] for k in keys}


# --- key sets -------------------------------------------------------------------------------------

def test_the_trim_threshold_is_the_quantile_of_the_flattened_keys_only():
    theta0, experts = vit_like(3)
    for expert, threshold in zip(experts.values(), trim_thresholds(theta0, experts, 0.2, VISION)):
        flat = torch.cat([(expert[k] - theta0[k]).abs().reshape(-1) for k in VISION])
        kth = flat.numel() - int(flat.numel() * 0.2)
        assert threshold == float(torch.kthvalue(flat, kth).values)
    # the zero leftovers in the quantile lower every task's threshold: the trim keeps more
    assert all(a < b for a, b in zip(trim_thresholds(theta0, experts, 0.2),
                                     trim_thresholds(theta0, experts, 0.2, VISION)))


@pytest.mark.parametrize("merge,returns_theta", [
    (lambda p, e, keys: merging.ties_merging(p, e, 0.2, "dis-mean", 0.4, keys=keys), True),
    (lambda p, e, keys: merging.dare_ties(p, e, 0.3, 0.5, 0.2, "dis-sum", seed=2, keys=keys), True),
    (lambda p, e, keys: merging.pcb_merging(p, e, 0.1, 1.1, keys=keys), True),
    (lambda p, e, keys: merging.multitask_vector(p, e, use_ties=True, keys=keys), False),
], ids=["ties", "dare_ties", "pcb", "tall_masks_use_ties"])
def test_a_key_set_merges_as_the_model_that_has_only_those_keys_and_keeps_theta0_elsewhere(
        merge, returns_theta):
    theta0, experts = vit_like(4, seed=3)
    got = merge(theta0, experts, VISION)
    # FusionBench's view: a model made of the vision tower alone
    want = merge(only(theta0, VISION), {t: only(e, VISION) for t, e in experts.items()}, None)
    assert_same(only(got, VISION), want)
    for key in [k for k, v in theta0.items() if v.is_floating_point() and k not in VISION]:
        # the projection (τ ≠ 0 in this toy) and the text leftovers are not merged
        assert torch.equal(got[key], theta0[key] if returns_theta else torch.zeros_like(theta0[key])), key
    # the whole model, as the originals flatten it, has other quantiles: another merge
    whole = merge(theta0, experts, None)
    assert any(not torch.equal(whole[k], got[k]) for k in VISION)


def test_the_vision_model_keys_are_what_a_clip_vision_model_state_dict_holds():
    clip = CLIPModel(tiny_config("quick_gelu")).eval()
    _randomise(clip, 1)
    tensors = {k: v for k, v in clip.state_dict().items() if not k.endswith("position_ids")}
    config = {"vision_config": clip.config.vision_config.to_dict(),
              "text_config": clip.config.text_config.to_dict()}
    converted = convert_image_encoder(tensors, config)
    keys = vision_model_keys(converted)
    vision = CLIPVisionModel(clip.config.vision_config).state_dict()  # what FusionBench flattens
    assert sum(converted[k].numel() for k in keys) == sum(v.numel() for v in vision.values())
    assert "model.visual.proj" not in keys and all(k.startswith("model.visual.") for k in keys)
    assert vision_model_keys({k: converted[k] for k in converted}) is None  # not a converted HF folder


class _Log:
    def __init__(self):
        self.lines = []

    def info(self, line=""):
        self.lines.append(line)


def _run(family, pretrained, experts):
    return types.SimpleNamespace(setup=types.SimpleNamespace(family=family), log=_Log(),
                                 experts=lambda: (pretrained, experts))


def test_the_run_flattens_the_vision_tower_on_the_fusionbench_family_only_and_logs_it():
    clip = CLIPModel(tiny_config("gelu")).eval()
    tensors = {k: v for k, v in clip.state_dict().items() if not k.endswith("position_ids")}
    config = {"vision_config": clip.config.vision_config.to_dict(),
              "text_config": clip.config.text_config.to_dict()}
    converted = convert_image_encoder(tensors, config)
    run = _run("fusionbench", converted, {})
    keys, field = flattened_keys(run)
    assert keys == vision_model_keys(converted) and field == {"key_set": "vision_model"}
    assert "vision tower only" in run.log.lines[-1]
    for family in ("task_vectors", "tall_masks", "embedded"):
        run = _run(family, converted, {})
        assert flattened_keys(run) == (None, {}) and "every floating-point key" in run.log.lines[-1]


# --- separate q/k/v -------------------------------------------------------------------------------

def split_layout(state_dict: dict) -> dict:
    """The toy with each fused in_proj as three tensors `<key>_q`, `_k`, `_v` (FusionBench's layout)."""
    out = {}
    for key, value in state_dict.items():
        if key.endswith(("attn.in_proj_weight", "attn.in_proj_bias")):
            out.update({f"{key}_{p}": value[rows].clone()
                        for p, rows in zip("qkv", row_blocks(key, value.shape[0], "separate"))})
        else:
            out[key] = value
    return out


def fuse_back(split: dict, like: dict) -> dict:
    return {k: torch.cat([split[f"{k}_{p}"] for p in "qkv"]) if f"{k}_q" in split else split[k]
            for k in like if k in split or f"{k}_q" in split}


MATRIX_METHODS = {
    "iso_c": lambda p, e, qkv: merging.iso_delta(p, e, "iso_c", qkv=qkv),
    "iso_cts": lambda p, e, qkv: merging.iso_delta(p, e, "iso_cts", 0.5, qkv=qkv),
    "wudi_adam": lambda p, e, qkv: merging.wudi_delta(p, e, "adam", 30, keys="all_2d", others="mean",
                                                      qkv=qkv),
    "wudi_closed_form": lambda p, e, qkv: merging.wudi_delta(p, e, "closed_form", keys="all_2d",
                                                             others="mean", qkv=qkv),
    "wudi_blocks": lambda p, e, qkv: merging.wudi_delta(p, e, "closed_form", qkv=qkv),
    "tsvm": lambda p, e, qkv: merging.tsv_delta(p, e, "TSVM", qkv=qkv),
    "tsvm_2": lambda p, e, qkv: merging.tsv_delta(p, e, "TSVM_2", qkv=qkv),
}


@pytest.mark.parametrize("method", MATRIX_METHODS)
def test_separate_qkv_is_merging_q_k_v_as_three_matrices_and_concatenating(method):
    theta0, experts = vit_like(3, seed=5)
    merge = MATRIX_METHODS[method]
    separate = merge(theta0, experts, "separate")
    by_hand = fuse_back(merge(split_layout(theta0), {t: split_layout(e) for t, e in experts.items()},
                              "fused"), separate)
    assert_same(separate, by_hand, atol=1e-6)
    fused = merge(theta0, experts, "fused")
    key = "model.visual.transformer.resblocks.0.attn.in_proj_weight"
    assert not torch.allclose(fused[key], separate[key], atol=1e-4)  # it is another merge
    assert_same({k: v for k, v in fused.items() if "in_proj_weight" not in k},
                {k: v for k, v in separate.items() if "in_proj_weight" not in k}, atol=1e-6)


def test_fused_qkv_is_the_one_matrix_merge_of_the_originals():
    theta0, experts = vit_like(3, seed=6)
    key = "model.visual.transformer.resblocks.1.attn.in_proj_weight"
    taus = [e[key] - theta0[key] for e in experts.values()]
    assert torch.allclose(merging.iso_delta(theta0, experts, "iso_c", qkv="fused")[key],
                          merging.iso.iso_c_key(sum(taus)), atol=1e-6)
    assert torch.allclose(merging.tsv_delta(theta0, experts, qkv="fused")[key],
                          merging.tsv.tsv_merge_key(iter(taus), 3), atol=1e-6)
    a, b, _ = merging.wudi.gram_terms(iter(taus))
    assert torch.allclose(merging.wudi_delta(theta0, experts, "closed_form", qkv="fused")[key],
                          merging.wudi.closed_form(a, b).float(), atol=1e-5)
    assert_same(merging.iso_delta(theta0, experts), merging.iso_delta(theta0, experts, qkv="fused"))


def test_emr_rescalers_take_per_tensor_means_over_q_k_v_in_separate_mode():
    theta0, experts = vit_like(4, seed=8)
    separate = merging.emr_merging(theta0, experts, qkv="separate")
    by_hand = merging.emr_merging(split_layout(theta0), {t: split_layout(e) for t, e in experts.items()})
    assert torch.allclose(separate.rescalers, by_hand.rescalers, rtol=1e-6)
    assert_same(separate.tau_uni, fuse_back(by_hand.tau_uni, separate.tau_uni))
    fused = merging.emr_merging(theta0, experts, qkv="fused")
    assert not torch.allclose(fused.rescalers, separate.rescalers, rtol=1e-4)
    assert torch.equal(fused.rescalers, merging.emr_merging(theta0, experts).rescalers)
    paper = [merging.emr_merging(theta0, experts, "paper", qkv=q).rescalers for q in ("fused", "separate")]
    assert torch.equal(*paper)  # whole-vector sums do not depend on what a tensor is


def test_auto_is_separate_on_the_fusionbench_family_and_in_fusionbench_s_preset():
    run = _run("fusionbench", {}, {})
    assert qkv_mode(run, "auto") == "separate" and qkv_mode(run, "fused") == "fused"
    for family in ("task_vectors", "tall_masks", "embedded"):
        run = _run(family, {}, {})
        assert qkv_mode(run, "auto") == "fused" and qkv_mode(run, "separate") == "separate"
        assert qkv_mode(run, "auto", fusionbench_preset=True) == "separate"


def test_labels_name_the_q_k_v_mode_and_the_key_set_where_they_change_the_result():
    iso = {"method": "iso_merging", "iso_method": "iso_c", "alpha": 1.0}
    assert method_label(iso) == "iso_c (α 1.0)"  # the originals' fused in_proj on their checkpoints
    assert method_label({**iso, "checkpoint_family": "fusionbench"}) == "iso_c (α 1.0, fused q/k/v)"
    assert method_label({**iso, "qkv": "separate"}) == "iso_c (α 1.0, separate q/k/v)"
    wudi = {"method": "wudi_merging", "wudi": {"preset": "fusionbench", "solver": "adam", "steps": 400},
            "qkv": "separate"}
    assert method_label(wudi) == "wudi_merging (fusionbench, Adam 400 steps, separate q/k/v)"
    tsv = {"method": "tsv_merging", "merge": "TSVM_1.0", "tsv_method": "TSVM", "alpha": 1.0, "qkv": "separate"}
    assert method_label(tsv) == "tsv_merging (TSVM, α 1.0, separate q/k/v)"
    emr = {"method": "emr_merging", "merge": "emr_code", "rescaler": "code", "qkv": "separate"}
    assert method_label(emr) == "emr_merging (code rescaler, separate q/k/v) †"
    ties = {"method": "ties_merging", "ties": {"merge": "dis-sum", "k": 0.2}, "scaling_coef": 0.3,
            "key_set": "vision_model"}
    assert method_label(ties) == "ties_merging (dis-sum, K 0.2, λ 0.3, vision-tower quantiles)"
    pcb = {"method": "pcb_merging", "pcb": {"ratio": 0.05, "lam": 1.2}}
    assert method_label(pcb) == "pcb_merging (pcb_ES balancing, fixed λ 1.2, r 0.05)"
    searched = {"method": "pcb_merging", "key_set": "vision_model", "val_curve": [{}],
                "pcb": {"ratio": 0.05, "search": {"budget": 100}, "lams": {"A": 1.0}}}
    assert method_label(searched) == ("pcb_merging (pcb_ES balancing, λ_t searched on val (100 merges), "
                                      "r 0.05, vision-tower quantiles)")


# --- PCB's λ search ---------------------------------------------------------------------------------

def test_pcb_combine_with_per_task_lambdas_is_pcb_delta():
    theta0, experts = vit_like(3, seed=9)
    lams = [0.9, 1.25, 1.05]
    scores = merging.pcb_scores(theta0, experts, 0.1, keys=VISION)
    assert_same(merging.pcb_combine(theta0, experts, scores, lams),
                merging.pcb_delta(theta0, experts, 0.1, lams, keys=VISION))


def _objective(target):
    # a step function of λ, as validation accuracy is: flat between thresholds
    def evaluate(lams):
        return {f"t{i}": float(np.floor(20 * (1 - abs(l - c))) / 20) for i, (l, c) in enumerate(zip(lams, target))}
    return evaluate


def test_the_lambda_search_is_seeded_bounded_and_spends_exactly_its_budget():
    evaluate = _objective([1.2, 0.85, 1.1])
    calls = []

    def counted(lams):
        calls.append(lams)
        return evaluate(lams)

    best, history = search_coefficients(counted, [1.0] * 3, 0.8, 1.3, 40, seed=3, log=lambda _: None)
    assert len(history) == 40 and len(calls) <= 40 and history[0]["lams"] == [1.0] * 3
    assert all(0.8 <= v <= 1.3 for h in history for v in h["lams"])
    top = max(h["avg_val_accuracy"] for h in history)
    assert np.mean(list(evaluate(best).values())) == top > history[0]["avg_val_accuracy"]
    again, _ = search_coefficients(evaluate, [1.0] * 3, 0.8, 1.3, 40, seed=3, log=lambda _: None)
    other, _ = search_coefficients(evaluate, [1.0] * 3, 0.8, 1.3, 40, seed=4, log=lambda _: None)
    assert again == best and other != best
    only_init, history = search_coefficients(evaluate, [1.0] * 3, 0.8, 1.3, 1, seed=0, log=lambda _: None)
    assert only_init == [1.0] * 3 and len(history) == 1


def test_ties_selected_over_a_key_set_zeroes_the_other_keys_and_sums_to_the_key_set_merge():
    g = torch.Generator().manual_seed(3)
    theta0 = {"a": torch.randn(6, 4, generator=g), "b": torch.randn(5, generator=g), "c": torch.randn(3, 3, generator=g)}
    experts = {t: {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in theta0.items()} for t in ("X", "Y", "Z")}
    selected = merging.ties_selected(theta0, experts, k=0.3, keys=["a", "c"])
    delta = merging.ties_delta(theta0, experts, k=0.3, merge="dis-sum", keys=["a", "c"])
    for key in ("a", "c"):
        assert torch.allclose(sum(selected[t][key] for t in experts), delta[key])
    assert all(torch.equal(selected[t]["b"], torch.zeros(5)) for t in experts)
    every = merging.ties_selected(theta0, experts, k=0.3)
    assert not all(torch.equal(every[t]["a"], selected[t]["a"]) for t in experts)  # the quantile moved
