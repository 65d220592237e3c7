import json

import pytest
import torch
from training_toys import apply_task_vectors, single_thread, toy_setup  # noqa: F401 (autouse)

from taskmerge.adaptive.adamerging_coefficients import (PUBLISHED_PATH, load_coefficients, load_published,
                                                        save_coefficients)
from taskmerge.adaptive.functional_merge import MergedEncoder
from taskmerge.models.encoders import ImageEncoder, build_image_encoder, create_clip


@pytest.fixture(scope="module")
def toy():
    return toy_setup()


def test_task_wise_merge_equals_state_dict_merge(toy):
    encoder, pre, taus, tasks, images, heads = toy
    merged = MergedEncoder(encoder, pre, taus, mode="task")
    lam = [0.1, 0.7, 0.25]
    merged.set_lambda(torch.tensor([lam]))
    expected = apply_task_vectors(pre, taus, lam)
    got = merged.merged_state_dict()
    assert list(got) == list(pre)          # every tensor, text leftovers included, in state-dict order
    for k in pre:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-6)
    x = images[tasks[0]].images[:4]
    plain = build_image_encoder("taskmerge-tiny", expected)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), plain(x), rtol=1e-5, atol=1e-5)


def test_source_vectors_may_be_loaded_one_at_a_time(toy):
    encoder, pre, taus, tasks, images, heads = toy
    loaded = []
    lazy = MergedEncoder(encoder, pre, [lambda t=t: loaded.append(t) or taus[t] for t in range(3)], mode="task")
    assert loaded == [0, 1, 2]
    eager = MergedEncoder(encoder, pre, taus, mode="task")
    for k, v in eager.merged_state_dict().items():
        assert torch.equal(lazy.merged_state_dict()[k], v)


def test_layer_wise_merge_uses_row_j_for_tensor_j(toy):
    encoder, pre, taus, tasks, images, heads = toy
    merged = MergedEncoder(encoder, pre, taus, mode="layer")
    P = len(pre)
    assert merged.lam_raw.shape == (P, 3)
    lam = torch.rand(P, 3, generator=torch.Generator().manual_seed(1))
    merged.set_lambda(lam)
    got = merged.merged_state_dict()
    for j, k in enumerate(pre):
        expected = pre[k] + sum(lam[j, t] * taus[t][k] for t in range(3))
        torch.testing.assert_close(got[k], expected, rtol=0, atol=1e-6)


def test_gradient_reaches_lambda_only(toy):
    encoder, pre, taus, tasks, images, heads = toy
    merged = MergedEncoder(encoder, pre, taus, mode="layer")
    merged(images[tasks[0]].images[:4]).square().sum().backward()
    assert merged.lam_raw.grad is not None and merged.lam_raw.grad.abs().sum() > 0
    for name, buf in merged.named_buffers():
        assert not buf.requires_grad and buf.grad is None, name
    for name, p in merged.encoder.named_parameters():
        assert not p.requires_grad and p.grad is None, name
    # The text-side leftovers are not used by encode_image: their rows get exactly zero gradient.
    text_rows = [j for j, k in enumerate(merged.param_names) if not k.startswith("model.visual.")]
    assert len(text_rows) == 6
    assert torch.all(merged.lam_raw.grad[text_rows] == 0)


def test_clamp_to_unit_interval(toy):
    encoder, pre, taus, tasks, images, heads = toy
    merged = MergedEncoder(encoder, pre, taus, mode="task")
    merged.set_lambda(torch.tensor([[-0.5, 0.4, 1.5]]))
    assert torch.equal(merged.lam(), torch.tensor([[0.0, 0.4, 1.0]]))
    expected = apply_task_vectors(pre, taus, [0.0, 0.4, 1.0])
    got = merged.merged_state_dict()
    for k in pre:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=1e-6)
    merged(images[tasks[0]].images[:4]).square().sum().backward()
    g = merged.lam_raw.grad[0]
    assert g[0] == 0 and g[2] == 0 and g[1] != 0   # hard clamp: no gradient outside [0, 1]
    unclamped = MergedEncoder(encoder, pre, taus, mode="task", clamp=False)
    unclamped.set_lambda(torch.tensor([[-0.5, 0.4, 1.5]]))
    unclamped(images[tasks[0]].images[:4]).square().sum().backward()
    assert torch.all(unclamped.lam_raw.grad != 0)


def test_bad_source_vectors_are_refused(toy):
    encoder, pre, taus, tasks, images, heads = toy
    broken = dict(taus[1])
    broken.pop("model.visual.proj")
    with pytest.raises(ValueError, match="source vector 1 lacks"):
        MergedEncoder(encoder, pre, [taus[0], broken], mode="task")
    with pytest.raises(ValueError, match="mode"):
        MergedEncoder(encoder, pre, taus, mode="block")


def test_published_tables_match_the_real_models():
    for model, P in (("ViT-B-32", 158), ("ViT-B-16", 158), ("ViT-L-14", 302)):
        table = load_published("lw_adamerging", model)
        assert table.mode == "layer" and table.rows.shape == (P, 9)
    tw = load_published("tw_adamerging", "ViT-B-32")
    assert tw.mode == "task"
    torch.testing.assert_close(tw.lam_for(["SUN397", "DTD"]), torch.tensor([[0.2202, 0.1692]]))
    # Row names are our ViT-B-32 ImageEncoder's state-dict keys, in order.
    names = list(ImageEncoder(create_clip("ViT-B-32")).state_dict().keys())
    table = load_published("lw_adamergingpp", "ViT-B-32")
    table.check_param_names(names)
    # The six text-leftover rows never moved from their init (METHODS.md §2.6).
    text_rows = [j for j, k in enumerate(names) if not k.startswith("model.visual.")]
    assert torch.all(table.lam[text_rows] == 0.3)


def test_published_table_errors_name_the_fix(toy):
    encoder, pre, taus, tasks, images, heads = toy
    with pytest.raises(ValueError, match="no published lw_adamerging table for model 'taskmerge-tiny'"):
        load_published("lw_adamerging", "taskmerge-tiny")
    with pytest.raises(ValueError, match="no published tw_adamerging table"):
        load_published("tw_adamerging", "ViT-L-14")
    with pytest.raises(ValueError, match="unknown AdaMerging method"):
        load_published("adamerging", "ViT-B-32")
    merged = MergedEncoder(encoder, pre, taus, mode="layer")
    with pytest.raises(ValueError, match="build_image_encoder\\('ViT-B-32'\\)"):
        merged.load_table(load_published("lw_adamerging", "ViT-B-32"), tasks=["SUN397", "Cars", "DTD"])
    with pytest.raises(ValueError, match="no coefficients for tasks"):
        load_published("tw_adamerging", "ViT-B-32").lam_for(tasks)


def test_learned_coefficients_round_trip(toy, tmp_path):
    encoder, pre, taus, tasks, images, heads = toy
    merged = MergedEncoder(encoder, pre, taus, mode="layer")
    merged.set_lambda(torch.rand(len(pre), 3, generator=torch.Generator().manual_seed(2)) / 3 + 1e-3)
    path = str(tmp_path / "coefficients.json")
    save_coefficients(path, merged.coefficient_rows(), method="lw_adamerging", model_name="taskmerge-tiny",
                      tasks=tasks, param_names=merged.param_names)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    table = load_coefficients(path)
    assert torch.equal(table.rows, merged.coefficient_rows())   # bit for bit
    other = MergedEncoder(encoder, pre, taus, mode="layer")
    other.load_table(table, list(reversed(tasks)))               # columns picked by task name
    assert torch.equal(other.lam(), merged.lam().flip(1))
    with pytest.raises(ValueError, match="task-wise merge"):
        MergedEncoder(encoder, pre, taus, mode="task").load_table(table, tasks)
    with open(path) as f:
        data = json.load(f)
    assert data["param_names"] == merged.param_names and data["task_order"] == tasks


def test_shipped_table_is_the_spec_copy():
    with open(PUBLISHED_PATH) as f:
        data = json.load(f)
    assert set(data["coefficients"]) >= {"lw_adamerging/ViT-B-32", "lw_adamergingpp/ViT-L-14"}
    assert data["task_order"][0] == "SUN397" and data["task_order"][-1] == "DTD"
