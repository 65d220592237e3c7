"""A cache that cannot be read is a miss, said in one line, and recomputed; a resume state or an
explicitly given file that cannot be read is refused in one line naming it. Never a raw traceback,
and never torch's advice to load with weights_only=False."""
import json
import os
import pickle

import pytest
import torch

from taskmerge.adaptive.adamerging_coefficients import find_saved, load_coefficients, save_coefficients, saved_path
from taskmerge.adaptive.feature_cache import FeatureCache
from taskmerge.adaptive.training_state import TrainingCheckpoint
from taskmerge.runs.setup import _read_json_cache
from taskmerge.storage.errors import InputError


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", b"not a torch file at all",
                                     pickle.dumps({"key_hash": "x", "evil": _Evil()})])
def test_an_unreadable_resume_state_is_refused_in_one_line(tmp_path, content):
    state = TrainingCheckpoint(str(tmp_path), "surgery", {"a": 1}, every=1)
    with open(state.path, "wb") as f:
        f.write(content)
    with pytest.raises(InputError) as e:
        state.load()
    message = str(e.value)
    assert state.path in message and "\n" not in message
    assert "weights_only" not in message and "delete it" in message


def test_a_resume_state_of_another_layout_is_refused(tmp_path):
    state = TrainingCheckpoint(str(tmp_path), "surgery", {"a": 1}, every=1)
    torch.save([1, 2, 3], state.path)
    with pytest.raises(InputError, match="not a resume state written by taskmerge"):
        state.load()
    torch.save({"key_hash": state.key_hash, "key": {"a": 1}, "step": 3}, state.path)
    assert state.load()["step"] == 3


@pytest.mark.parametrize("cut", [0, 7, 100])
def test_a_truncated_feature_cache_is_a_miss_said_in_one_line(tmp_path, cut):
    said = []
    cache = FeatureCache(str(tmp_path), log=said.append)
    key = {"task": "T"}
    cache.store(key, {"final": torch.arange(1000.0)})
    path = cache.path_for(key)
    with open(path, "r+b") as f:
        f.truncate(cut if cut else os.path.getsize(path) - 8)
    calls = []
    got = cache.get_or_compute(key, lambda: calls.append(1) or {"final": torch.ones(3)})
    assert calls == [1] and torch.equal(got["final"], torch.ones(3))
    assert len(said) == 1 and path in said[0] and "computing the features again" in said[0]
    assert torch.equal(cache.load(key)["final"], torch.ones(3))  # rewritten whole


def test_a_corrupt_individual_accuracy_cache_is_a_miss(tmp_path):
    path = tmp_path / "individual_accuracies_test.json"
    said = []
    for content in ("{ truncated", "[1, 2]", "\udcff".encode("utf-8", "surrogatepass").decode("latin-1")):
        path.write_text(content, encoding="latin-1")
        assert _read_json_cache(str(path), said.append) == {}
    assert len(said) == 3 and all(str(path) in s for s in said)
    path.write_text(json.dumps({"h": {"key": {"task": "T"}, "accuracy": 0.5}, "old": 0.3}))
    assert _read_json_cache(str(path), said.append) == {"h": {"key": {"task": "T"}, "accuracy": 0.5}}


def test_unreadable_saved_coefficients_are_a_miss_and_a_given_file_a_clear_error(tmp_path):
    key = {"prior": 0.3}
    path = saved_path(str(tmp_path), "tw_adamerging", key)
    save_coefficients(path, torch.tensor([[1.0, 0.3, 0.3]]), method="tw_adamerging", model_name="m",
                      tasks=["A", "B"], key=key)
    assert find_saved(str(tmp_path), "tw_adamerging", key) == (path, "")
    with open(path, "r+b") as f:
        f.truncate(20)
    found, why = find_saved(str(tmp_path), "tw_adamerging", key)
    assert found is None and "cannot be read" in why
    with pytest.raises(InputError, match="cannot be read as a coefficient file") as e:
        load_coefficients(path)
    assert path in str(e.value)
    with open(path, "w") as f:
        f.write("[]")
    with pytest.raises(InputError, match="not a coefficient file"):
        load_coefficients(path)
