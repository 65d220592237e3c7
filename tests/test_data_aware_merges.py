"""Fisher merging, RegMean and RegMean++ (issue #20): the merge math on hand cases and invariants,
the statistics against independent computations, RegMean++ against RegMean where they must agree,
and the scripts end to end on the micro benchmark: cached statistics, clear errors, Surgery bases,
two torchrun ranks."""
import os

import pytest
import torch
import torch.nn.functional as F
from script_variables import SRC, script_config
from test_distributed import _args, _common, _reports, _torchrun, micro_copy  # noqa: F401 (a fixture)

from taskmerge.adaptive import statistics as stats
from taskmerge.adaptive.adaptation_data import TaskImages
from taskmerge.datasets.errors import DatasetLayoutError
from taskmerge.merging.fisher import fisher_merging
from taskmerge.merging.regmean import (LinearMap, SingularGramError, reduce_non_diagonal,
                                       regmean_merging)
from taskmerge.models.encoders import ImageEncoder, TINY_MODEL, build_image_encoder, clip_from_config, model_config
from taskmerge.models.heads import ClassificationHead
from taskmerge.runs import train_statistics
from taskmerge.runs.adaptive import run_surgery
from taskmerge.runs.data_free import run_data_free
from taskmerge.runs.reporting import method_label

MODEL = "taskmerge-tiny-micro"


def _states(num: int, seed: int = 0, shapes=None):
    g = torch.Generator().manual_seed(seed)
    shapes = shapes or {"w": (3, 4), "b": (3,), "ln": (4,)}
    theta0 = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    experts = {f"t{i}": {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in theta0.items()}
               for i in range(num)}
    return theta0, experts


# --- Fisher merging: the math ---------------------------------------------------------------------

def test_fisher_of_one_task_is_that_expert():
    theta0, experts = _states(1)
    fisher = {"t0": {k: torch.rand(v.shape) for k, v in theta0.items()}}
    merged = fisher_merging(theta0, experts, fisher)
    for k in theta0:
        torch.testing.assert_close(merged[k], experts["t0"][k], rtol=1e-6, atol=1e-6)


def test_equal_fishers_give_weight_averaging():
    theta0, experts = _states(3)
    same = {k: torch.rand(v.shape) for k, v in theta0.items()}
    for normalize in (True, False):
        merged = fisher_merging(theta0, experts, {t: same for t in experts}, normalize=normalize)
        for k in theta0:
            mean = torch.stack([e[k] for e in experts.values()]).mean(0)
            torch.testing.assert_close(merged[k], mean, rtol=1e-5, atol=1e-6)


def test_normalisation_makes_a_fishers_scale_irrelevant_and_matches_fusionbench_formula():
    theta0, experts = _states(2)
    g = torch.Generator().manual_seed(3)
    fishers = {t: {k: torch.rand(v.shape, generator=g) for k, v in theta0.items()} for t in experts}
    scaled = {"t0": {k: 1000 * v for k, v in fishers["t0"].items()}, "t1": fishers["t1"]}
    eps = 1e-6
    a = fisher_merging(theta0, experts, fishers, minimal_weight=eps)
    b = fisher_merging(theta0, experts, scaled, minimal_weight=eps)
    raw_a = fisher_merging(theta0, experts, fishers, normalize=False, minimal_weight=eps)
    raw_b = fisher_merging(theta0, experts, scaled, normalize=False, minimal_weight=eps)
    # FusionBench's merging_with_fisher_weights, written out: c_t ∝ 1/(‖F_t‖ + ε), normalised to 1/n
    norms = {t: torch.stack([f[k].norm() for k in theta0]).norm() for t, f in scaled.items()}
    inv = {t: 1 / (n + eps) for t, n in norms.items()}
    c = {t: 0.5 * inv[t] / sum(inv.values()) for t in scaled}
    for k in theta0:
        num = sum(c[t] * (scaled[t][k] + eps) * experts[t][k] for t in experts)
        den = sum(c[t] * (scaled[t][k] + eps) for t in experts)
        torch.testing.assert_close(b[k], num / den, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)
    assert any(not torch.allclose(raw_a[k], raw_b[k], atol=1e-3) for k in theta0)


def test_keys_outside_the_merged_set_keep_theta0():
    theta0, experts = _states(2)
    fishers = {t: {k: torch.rand(v.shape) for k, v in theta0.items()} for t in experts}
    merged = fisher_merging(theta0, experts, fishers, keys=["w", "b"])
    assert torch.equal(merged["ln"], theta0["ln"]) and not torch.equal(merged["w"], theta0["w"])


# --- RegMean: the math ----------------------------------------------------------------------------

def _linear_case(num, rows=40, d_in=5, d_out=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    theta0 = {"w": torch.randn(d_out, d_in, generator=g), "b": torch.randn(d_out, generator=g)}
    experts = {f"t{i}": {k: v + torch.randn(v.shape, generator=g) for k, v in theta0.items()}
               for i in range(num)}
    xs = {t: torch.randn(rows, d_in, generator=g) * torch.linspace(0.5, 2, d_in) for t in experts}
    grams = {t: {"g": x.t() @ x / rows} for t, x in xs.items()}
    return theta0, experts, xs, grams, [LinearMap("w", "g", "b")]


def test_regmean_of_one_task_is_that_expert():
    theta0, experts, _, grams, maps = _linear_case(1)
    merged = regmean_merging(theta0, experts, grams, maps, ratio=0.95)
    for k in theta0:
        torch.testing.assert_close(merged[k], experts["t0"][k], rtol=1e-5, atol=1e-5)


def test_regmean_on_a_linear_model_is_the_least_squares_merge():
    theta0, experts, xs, grams, maps = _linear_case(3)
    merged = regmean_merging(theta0, experts, grams, maps, ratio=1.0)
    x = torch.cat([xs[t] for t in experts]).double()
    y = torch.cat([xs[t].double() @ experts[t]["w"].double().t() for t in experts])
    direct = torch.linalg.lstsq(x, y).solution.t()
    torch.testing.assert_close(merged["w"].double(), direct, rtol=1e-4, atol=1e-5)
    # the bias is not part of the regression: the experts' mean, as FusionBench
    torch.testing.assert_close(merged["b"], torch.stack([e["b"] for e in experts.values()]).mean(0))


def test_ratio_zero_is_a_per_input_feature_weighted_average():
    theta0, experts, _, grams, maps = _linear_case(3)
    merged = regmean_merging(theta0, experts, grams, maps, ratio=0.0)
    d = {t: grams[t]["g"].diagonal() for t in experts}
    expected = sum(experts[t]["w"] * d[t] for t in experts) / sum(d.values())
    torch.testing.assert_close(merged["w"], expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(merged["w"], regmean_merging(theta0, experts, grams, maps, ratio=0.95)["w"])


def test_reduce_non_diagonal_is_fusionbenchs_scaling():
    g = torch.randn(4, 4)
    alpha = 0.95
    expected = g * (torch.diag(torch.ones(4) - alpha) + torch.full((4, 4), alpha))
    torch.testing.assert_close(reduce_non_diagonal(g, alpha), expected)


def test_a_singular_gram_is_one_error_that_names_the_fix_and_a_ridge_solves_it():
    theta0, experts, _, _, maps = _linear_case(2)
    x = torch.randn(2, 5, dtype=torch.float64)   # two rows: rank 2 of 5
    grams = {t: {"g": x.t() @ x} for t in experts}
    with pytest.raises(SingularGramError, match="reduce_non_diagonal_ratio below 1.*regmean_ridge"):
        regmean_merging(theta0, experts, grams, maps, ratio=1.0)
    merged = regmean_merging(theta0, experts, grams, maps, ratio=1.0, ridge=1e-3)
    assert torch.isfinite(merged["w"]).all()


# --- the statistics --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_image_encoder(TINY_MODEL)


def test_the_forward_taken_apart_is_open_clips(tiny):
    visual = tiny.model.visual
    x = torch.randn(3, 3, 32, 32)
    tokens = stats.stem(visual, x)
    for block in visual.transformer.resblocks:
        out, inputs = stats.block_with_inputs(block, tokens)
        assert torch.equal(out, block(tokens))
        # the attention's output projection on the recorded input is what the module gives
        h = block.ln_1(tokens)
        torch.testing.assert_close(F.linear(inputs["attn.out_proj"], block.attn.out_proj.weight,
                                            block.attn.out_proj.bias),
                                   block.attn(h, h, h, need_weights=False)[0], rtol=1e-5, atol=1e-6)
        tokens = out
    assert torch.equal(stats.pooled(visual, tokens) @ visual.proj, tiny(x))


def test_grams_are_the_mean_over_tokens_of_each_maps_input_seen_by_module_hooks(tiny):
    images = TaskImages.from_tensors(torch.randn(5, 3, 32, 32), torch.zeros(5))
    keys = list(tiny.state_dict())
    maps = stats.linear_maps(keys)
    assert {m.weight for m in maps} >= {"model.visual.proj", stats.BLOCKS + "0.attn.in_proj_weight"}
    grams = stats.gram_matrices(tiny, images, maps, batch_size=2)
    seen = {}
    block = tiny.model.visual.transformer.resblocks[1]
    hooks = [block.ln_1.register_forward_hook(lambda m, i, o: seen.setdefault("ln_1", []).append(o)),
             block.mlp.c_fc.register_forward_pre_hook(lambda m, i: seen.setdefault("c_fc", []).append(i[0])),
             block.mlp.c_proj.register_forward_pre_hook(lambda m, i: seen.setdefault("c_proj", []).append(i[0]))]
    with torch.no_grad():
        tiny(images.images)
    for h in hooks:
        h.remove()
    for name, site in (("ln_1", "attn.in_proj"), ("c_fc", "mlp.c_fc"), ("c_proj", "mlp.c_proj")):
        x = torch.cat(seen[name]).reshape(-1, seen[name][0].shape[-1])
        torch.testing.assert_close(grams[f"{stats.BLOCKS}1.{site}"], x.t() @ x / len(x), rtol=1e-4, atol=1e-5)


def test_fisher_estimates_match_their_definitions(tiny):
    g = torch.Generator().manual_seed(1)
    images = TaskImages.from_tensors(torch.randn(5, 3, 32, 32, generator=g), torch.tensor([0, 1, 2, 1, 0]))
    head = ClassificationHead(torch.randn(3, tiny.feature_dim, generator=g))
    keys = ["model.visual.proj", "model.visual.ln_post.weight", "model.logit_scale"]
    params = dict(tiny.named_parameters())
    for estimate, batch in (("fusionbench", 2), ("empirical", 2)):
        got = stats.diagonal_fisher(tiny, head, images, keys, estimate=estimate, batch_size=batch)
        expected = {k: torch.zeros_like(params[k]) for k in keys[:2]}
        for p in params.values():
            p.requires_grad_(True)
        groups = ([range(0, 2), range(2, 4), range(4, 5)] if estimate == "fusionbench"
                  else [range(i, i + 1) for i in range(5)])
        for idx in groups:
            logits = head(tiny(images.images[list(idx)]))
            if estimate == "fusionbench":
                p = logits.softmax(-1).detach()
                objective = (p.sqrt() * logits.log_softmax(-1)).sum()
            else:
                objective = F.cross_entropy(logits, images.labels[list(idx)])
            grads = torch.autograd.grad(objective, [params[k] for k in keys[:2]])
            for k, gr in zip(keys[:2], grads):
                expected[k] += gr ** 2
        for p in params.values():
            p.requires_grad_(False)
        for k in keys[:2]:
            torch.testing.assert_close(got[k], expected[k] / 5, rtol=1e-4, atol=1e-9)
        assert torch.equal(got["model.logit_scale"], torch.zeros(()))   # not in the image forward


def _one_block_encoder():
    config = model_config(TINY_MODEL)
    config["vision_cfg"] = {**config["vision_cfg"], "layers": 1}
    torch.manual_seed(2)
    return ImageEncoder(clip_from_config(config)).eval()


def _experts_of(encoder, num, differ, seed=3):
    g = torch.Generator().manual_seed(seed)
    theta0 = {k: v.clone() for k, v in encoder.state_dict().items()}
    return theta0, {f"t{i}": {k: v + 0.05 * torch.randn(v.shape, generator=g) if differ(k) else v.clone()
                              for k, v in theta0.items()} for i in range(num)}


def _regmean(encoder, theta0, experts, images, keys, ratio=0.95):
    grams = {}
    for t, sd in experts.items():
        enc = _one_block_encoder()
        enc.load_state_dict(sd)
        grams[t] = stats.gram_matrices(enc, images[t], stats.linear_maps(keys), batch_size=4)
    return regmean_merging(theta0, experts, grams, stats.linear_maps(keys), keys, ratio=ratio)


def test_regmean_plusplus_on_a_one_block_model_is_regmean():
    encoder = _one_block_encoder()
    g = torch.Generator().manual_seed(4)
    images = {f"t{i}": TaskImages.from_tensors(torch.randn(16, 3, 32, 32, generator=g), torch.zeros(16))
              for i in range(3)}
    keys = [k for k, v in encoder.state_dict().items() if v.is_floating_point()]
    # the experts differ in the block only: both methods see the same block inputs
    theta0, experts = _experts_of(encoder, 3, lambda k: k.startswith(stats.BLOCKS))
    plain = _regmean(encoder, theta0, experts, images, keys)
    plus = stats.regmean_plusplus(_one_block_encoder(), theta0, experts, images, keys, ratio=0.95,
                                  batch_size=4, log=lambda s: None)
    for k in keys:
        torch.testing.assert_close(plus[k], plain[k], rtol=1e-4, atol=2e-5)
    # experts whose stems differ: RegMean++ feeds the block through the averaged stem, RegMean through
    # each expert's own, and the two merges part
    theta0, experts = _experts_of(encoder, 3, lambda k: not k.startswith("model.visual.ln_post"))
    plain = _regmean(encoder, theta0, experts, images, keys)
    plus = stats.regmean_plusplus(_one_block_encoder(), theta0, experts, images, keys, ratio=0.95,
                                  batch_size=4, log=lambda s: None)
    w = stats.BLOCKS + "0.mlp.c_fc.weight"
    assert not torch.allclose(plus[w], plain[w], atol=1e-4)
    # the original keeps ln_post and the projection at θ0; "merged" averages ln_post
    assert torch.equal(plus["model.visual.proj"], theta0["model.visual.proj"])
    merged_post = stats.regmean_plusplus(_one_block_encoder(), theta0, experts, images, keys, ratio=0.95,
                                         post="merged", batch_size=4, log=lambda s: None)
    assert not torch.equal(merged_post["model.visual.proj"], theta0["model.visual.proj"])


# --- the scripts on the micro benchmark --------------------------------------------------------------

@pytest.fixture
def micro_config(micro_copy, tmp_path):
    ckpt, data = micro_copy
    return {"model_name": MODEL, "checkpoint_dir": ckpt, "data_location": data, "device": "cpu",
            "log_dir": str(tmp_path / "logs"), "save_dir": str(tmp_path / "merged"),
            "cache_dir": str(tmp_path / "cache")}



@pytest.mark.parametrize("script, settings, kind", [
    ("main_FisherMerging.py", {"num_fisher_examples": 8, "fisher_batch_size": 4}, "fisher"),
    ("main_RegMean.py", {"num_regmean_examples": 8}, "grams"),
    ("main_RegMean.py", {"num_regmean_examples": 8, "method": "regmean_plusplus"}, "regmean_plusplus")])
def test_scripts_run_and_a_second_run_reads_the_statistics_back(micro_config, script, settings, kind, tmp_path):
    first = run_data_free(script_config(script, **micro_config, **settings), script=script)
    folder = os.path.join(micro_config["cache_dir"], MODEL, "statistics")
    cached = sorted(os.listdir(folder))
    assert cached and all(f.startswith(kind + "_") for f in cached)
    assert len(cached) == (1 if kind == "regmean_plusplus" else len(first["tasks"]))
    second = run_data_free(script_config(script, **micro_config, **settings), script=script)
    assert second["accuracy"] == first["accuracy"] and sorted(os.listdir(folder)) == cached
    from safetensors.torch import load_file
    a, b = load_file(first["merged_file"]), load_file(second["merged_file"])
    assert all(torch.equal(a[k], b[k]) for k in a)
    # another sample is other statistics
    third = run_data_free(script_config(script, **micro_config, **settings, sample_seed=1), script=script)
    assert len(os.listdir(folder)) == 2 * len(cached)
    assert third["sample_seed"] == 1
    label = method_label(first)
    assert label.startswith(("fisher_merging (", "regmean (", "regmean_plusplus (")) and "8 examples" in label


def test_a_train_split_too_small_or_missing_is_one_error_naming_the_task(micro_config, monkeypatch):
    with pytest.raises(DatasetLayoutError, match=r"Digits: the training split .* fewer than num_fisher_examples"):
        run_data_free(script_config("main_FisherMerging.py", **micro_config, num_fisher_examples=10**6),
                      script="main_FisherMerging.py")
    real = train_statistics.task_data

    def without_train(setup, task, split="test"):
        import dataclasses
        return dataclasses.replace(real(setup, task, split), train=None)
    monkeypatch.setattr(train_statistics, "task_data", without_train)
    with pytest.raises(DatasetLayoutError, match="Digits: no training split.*num_regmean_examples"):
        run_data_free(script_config("main_RegMean.py", **micro_config, num_regmean_examples=4),
                      script="main_RegMean.py")


@pytest.mark.parametrize("base, surgery", [("fisher_merging", "v1"), ("regmean_plusplus", "v2")])
def test_they_are_surgery_bases(micro_config, base, surgery):
    extra = {"num_fisher_examples": 8} if base == "fisher_merging" else {"num_regmean_examples": 8}
    report = run_surgery(script_config("main_Surgery.py", **micro_config, method_name=base, surgery=surgery,
                                       iterations=2, eval_iterations=2, rank=4, resume_dir="", **extra),
                         script="main_Surgery.py")
    assert report["surgery"] == surgery and report["base"].startswith(base)
    assert set(report["accuracy"]) == set(report["base_accuracy"]) == set(report["tasks"])


def test_two_torchrun_ranks_compute_the_statistics_one_process_does(micro_copy, tmp_path):  # noqa: F811
    settings = {"num_fisher_examples": 12, "fisher_batch_size": 4}
    one_common = _common(micro_copy, tmp_path / "one")
    one = run_data_free(script_config("main_FisherMerging.py", **one_common, **settings,
                                      cache_dir=str(tmp_path / "cache_one")), script="main_FisherMerging.py")
    two_settings = {**_common(micro_copy, tmp_path / "two"), **settings, "cache_dir": str(tmp_path / "cache_two")}
    _torchrun([os.path.join(SRC, "main_FisherMerging.py"), *_args(two_settings)], cwd=str(tmp_path))
    two, = _reports(tmp_path / "two" / "logs")
    assert two["accuracy"] == pytest.approx(one["accuracy"], abs=1e-6)
    assert two["fisher_weights"] == pytest.approx(one["fisher_weights"], rel=1e-5)
    from safetensors.torch import load_file
    for name in os.listdir(tmp_path / "cache_one" / MODEL / "statistics"):
        a = load_file(str(tmp_path / "cache_one" / MODEL / "statistics" / name))
        b = load_file(str(tmp_path / "cache_two" / MODEL / "statistics" / name))
        assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-12) for k in a)
    # RegMean++: each rank holds its share of every task's block inputs
    pp = {"method": "regmean_plusplus", "num_regmean_examples": 6}
    one = run_data_free(script_config("main_RegMean.py", **one_common, **pp, cache_dir=str(tmp_path / "c1")),
                        script="main_RegMean.py")
    _torchrun([os.path.join(SRC, "main_RegMean.py"),
               *_args({**_common(micro_copy, tmp_path / "three"), **pp, "cache_dir": str(tmp_path / "c3")})],
              cwd=str(tmp_path))
    three, = _reports(tmp_path / "three" / "logs")
    assert three["accuracy"] == pytest.approx(one["accuracy"], abs=1e-6)
