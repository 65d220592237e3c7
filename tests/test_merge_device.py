"""`merge_device` / `device=`: the decomposition-heavy merges (TSV-M, TSVM_2, TSV-C, Iso-C, Iso-CTS)
move each 2-D key to the device for its SVDs and bring the result back to the CPU. On a CPU-only
machine the device path runs with device="cpu" and must give exactly the streaming path's result, on
the CPU, for every key."""
import pytest
import torch

from taskmerge import merging
from vit_toys import vit_like


def _same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].device.type == "cpu", k
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


@pytest.mark.parametrize("method", ["TSVM", "TSVM_2"])
def test_tsv_on_a_device_equals_the_cpu_path(method):
    theta0, experts = vit_like(3)
    _same(merging.tsv_merging(theta0, experts, 0.7, method, device=torch.device("cpu")),
          merging.tsv_merging(theta0, experts, 0.7, method))


def test_tsv_compress_on_a_device_equals_the_cpu_path():
    theta0, experts = vit_like(3)
    on_device = merging.tsv_compress(theta0, experts, device="cpu")
    plain = merging.tsv_compress(theta0, experts)
    for task in on_device.tasks:
        _same(on_device.task_state_dict(theta0, task), plain.task_state_dict(theta0, task))


@pytest.mark.parametrize("method", ["iso_c", "iso_cts"])
def test_iso_on_a_device_equals_the_cpu_path(method):
    theta0, experts = vit_like(4)
    _same(merging.iso_merging(theta0, experts, 1.3, method, device="cpu"),
          merging.iso_merging(theta0, experts, 1.3, method))


def test_the_device_path_moves_every_decomposed_key(monkeypatch):
    """Each 2-D key's task vectors go through .to(device) exactly once per task (and nothing else)."""
    theta0, experts = vit_like(2)
    moved = []
    real_to = torch.Tensor.to

    def to(self, *args, **kwargs):
        if args and args[0] == "cpu" and self.ndim == 2:
            moved.append(tuple(self.shape))
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to)
    merging.tsv_delta(theta0, experts, "TSVM", device="cpu")
    two_d = [tuple(v.shape) for k, v in theta0.items() if v.ndim == 2 and "text_projection" not in k]
    assert sorted(moved) == sorted(two_d * len(experts))
