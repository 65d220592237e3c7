"""Compact per-task results (bit-packed masks, low-rank factors): files, sizes, and input checks."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from test_merging_invariants import SHAPES, make

from taskmerge import merging
from taskmerge.merging import bitpack
from taskmerge.merging.task_vectors import validate
from taskmerge.storage.checkpoints import CheckpointError, open_state_dict


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 5), (2, 3, 4)])
def test_bitpack_roundtrip_in_numpy_packbits_layout(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(1)) > 0.5
    packed = bitpack.pack(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy().reshape(-1)))
    assert torch.equal(bitpack.unpack(packed, shape), mask)
    with pytest.raises(ValueError, match="needs"):
        bitpack.unpack(packed, (mask.numel() + 9,))


def per_task_results(theta0, experts):
    return {"emr": merging.emr_merging(theta0, experts),
            "tsvc": merging.tsv_compress(theta0, experts),
            "tall": merging.tall_masks(theta0, experts, [0.2, 0.4, 0.6], use_ties=True)}


@pytest.mark.parametrize("name", ["emr", "tsvc", "tall"])
def test_save_load_roundtrip_gives_the_same_task_models(tmp_path, name):
    theta0, experts = make(3)
    result = per_task_results(theta0, experts)[name]
    path = str(tmp_path / f"{name}.safetensors")
    result.save(path)
    loaded = type(result).load(path)
    assert loaded.tasks == ["task0", "task1", "task2"]
    for task in loaded.tasks:
        got, want = loaded.task_state_dict(theta0, task), result.task_state_dict(theta0, task)
        assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert loaded.storage_report() == result.storage_report()
    if name == "tall":  # the loaded τ_MTL is read from the file key by key
        got, want = (merging.consensus_merging(theta0, t, alpha=0.5) for t in (loaded, result))
        assert all(torch.equal(got[k], want[k]) for k in want)
    other = "emr" if name != "emr" else "tall"
    with pytest.raises(ValueError, match="expected"):
        type(per_task_results(theta0, experts)[other]).load(path)


def test_storage_reports_count_bits_factors_and_floats():
    theta0, experts = make(3)
    numel = {k: torch.Size(s).numel() for k, s in SHAPES.items()}  # w 96, tp 36, conv 48, b 12, 1
    dense = 4 * sum(numel.values())
    masks = sum((n + 7) // 8 for n in numel.values())
    emr = merging.emr_merging(theta0, experts).storage_report()
    assert emr == {"num_tasks": 3, "shared_bytes": dense, "per_task_bytes": masks + 4,
                   "dense_per_task_bytes": dense, "per_task_fraction": (masks + 4) / dense}
    tall = merging.tall_masks(theta0, experts, 0.4).storage_report()
    assert tall["per_task_bytes"] == masks and tall["shared_bytes"] == dense
    # TSV-C, k = r // 3: w 12×8 → 2·(12+8+1), text_projection 6×6 → 2·(6+6+1); the rest dense
    tsvc = merging.tsv_compress(theta0, experts).storage_report()
    want = 4 * (2 * 21 + 2 * 13 + numel["conv"] + numel["b"] + numel["scale"])
    assert tsvc["per_task_bytes"] == [want] * 3 and tsvc["dense_per_task_bytes"] == dense


METHODS = {
    "wa": lambda p, e: merging.weight_averaging(p, e),
    "ta": lambda p, e: merging.task_arithmetic(p, e),
    "ties": lambda p, e: merging.ties_merging(p, e),
    "ties_selected": lambda p, e: merging.ties_selected(p, e),
    "emr": lambda p, e: merging.emr_merging(p, e),
    "tsvm": lambda p, e: merging.tsv_merging(p, e),
    "tsvc": lambda p, e: merging.tsv_compress(p, e),
    "tall": lambda p, e: merging.tall_masks(p, e, 0.4),
}


class CountingReader(dict):
    """A dict that counts how often each key is read, to see whether merging started."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.reads = {}

    def __getitem__(self, key):
        self.reads[key] = self.reads.get(key, 0) + 1
        return super().__getitem__(key)


def write_experts(tmp_path, theta0, experts):
    save_file({k: v for k, v in theta0.items()}, str(tmp_path / "zeroshot.safetensors"))
    for task, sd in experts.items():
        save_file(sd, str(tmp_path / f"{task}.safetensors"))
    return {t: open_state_dict(str(tmp_path / f"{t}.safetensors")) for t in experts}


BREAKAGES = {
    "missing key": (lambda e: e.pop("b"), "missing \\['b'\\]"),
    "shape": (lambda e: e.__setitem__("w", torch.zeros(8, 12)), "'w' has shape \\(8, 12\\)"),
    "dtype": (lambda e: e.__setitem__("w", e["w"].double()), "'w' has dtype torch.float64"),
    "nan": (lambda e: e["conv"].view(-1).__setitem__(5, float("nan")), "'conv' has 1 NaN"),
}


@pytest.mark.parametrize("breakage", sorted(BREAKAGES))
@pytest.mark.parametrize("method", sorted(METHODS))
def test_mismatched_experts_fail_before_any_work_naming_file_and_key(tmp_path, method, breakage):
    theta0, experts = make(3)
    theta0 = {k: v for k, v in theta0.items()}
    break_it, message = BREAKAGES[breakage]
    break_it(experts["task2"])
    readers = write_experts(tmp_path, theta0, experts)
    counting, checked_only = CountingReader(theta0), CountingReader(theta0)
    with pytest.raises(CheckpointError, match=message) as err:
        METHODS[method](counting, readers)
    assert "task2.safetensors" in str(err.value)
    with pytest.raises(CheckpointError):
        validate(checked_only, readers)
    assert counting.reads == checked_only.reads  # θ0 was read by the check and nothing else
