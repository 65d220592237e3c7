"""Task vectors as lazy mappings: arithmetic, `apply`, and nothing read before it is used."""
import pytest
import torch
from test_merging_storage import CountingReader

from taskmerge import merging
from taskmerge.merging.task_vectors import TaskVector, apply, merged_keys, sum_of_task_vectors, task_vector


def models():
    g = torch.Generator().manual_seed(3)
    theta0 = {"w": torch.randn(3, 2, generator=g), "b": torch.randn(3, generator=g),
              "ids": torch.arange(3)}
    experts = [{k: (v + torch.randn(v.shape, generator=g)) if v.is_floating_point() else v + 1
                for k, v in theta0.items()} for _ in range(3)]
    return theta0, experts


def test_arithmetic_is_lazy_and_matches_eager():
    theta0, (e1, e2, e3) = models()
    counting = CountingReader(e1)
    tau1, tau2 = task_vector(theta0, counting), task_vector(theta0, e2)
    combo = 0.5 * (tau1 + tau2) - tau1 + (-tau2)
    assert "w" in combo and "ids" not in combo and list(combo) == ["w", "b"]
    assert counting.reads == {}  # building, iterating and membership read nothing
    for k in ("w", "b"):
        t1, t2 = e1[k] - theta0[k], e2[k] - theta0[k]
        torch.testing.assert_close(combo[k], 0.5 * (t1 + t2) - t1 - t2)
    total = sum(task_vector(theta0, e) for e in (e1, e2, e3))
    eager = sum_of_task_vectors(theta0, {"a": e1, "b": e2, "c": e3}).materialize()
    assert isinstance(total, TaskVector)
    for k in ("w", "b"):
        torch.testing.assert_close(total[k], eager[k])


def test_apply_copies_non_float_keys_and_can_consume_the_delta():
    theta0, (e1, *_) = models()
    delta = task_vector(theta0, e1).materialize()
    merged = apply(theta0, delta, 0.25)
    assert torch.equal(merged["ids"], theta0["ids"]) and merged["ids"] is not theta0["ids"]
    torch.testing.assert_close(merged["w"], theta0["w"] + 0.25 * (e1["w"] - theta0["w"]))
    consumed = apply(theta0, delta, 0.25, consume=True)
    assert delta == {} and all(torch.equal(consumed[k], merged[k]) for k in merged)


def test_merged_keys_skip_integer_buffers():
    theta0, _ = models()
    assert merged_keys(theta0) == ["w", "b"]


def test_experts_must_be_a_task_mapping():
    theta0, experts = models()
    with pytest.raises(TypeError, match="task: state dict"):
        merging.task_arithmetic(theta0, experts)
    with pytest.raises(ValueError, match="no fine-tuned experts"):
        merging.task_arithmetic(theta0, {})
