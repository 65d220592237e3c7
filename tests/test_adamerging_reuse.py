"""Saved AdaMerging coefficients are reused only for the same inputs: the checkpoints' digests, the
steps, lr and seed (and the rest of coefficients_key); any change is named, and nothing is reused."""
import dataclasses

import pytest
import torch

from taskmerge.adaptive.adamerging import AdaMergingConfig
from taskmerge.adaptive.adamerging_coefficients import find_saved, save_coefficients, saved_path


def key(digests=None, **settings):
    """coefficients_key's shape (runs/adaptive.py): run inputs, prior, clamp and the settings."""
    cfg = dataclasses.replace(AdaMergingConfig(steps=100, lr=1e-3, seed=0), **settings)
    return {"method": "lw_adamerging", "model": "ViT-B-32",
            "checkpoints": digests or {"pretrained": "aa", "Cars": "bb", "DTD": "cc"},
            "heads": {"Cars": "h1", "DTD": "h2"}, "data": {"Cars": "d1", "DTD": "d2"},
            "prior": "p", "clamp": True,
            "adamerging": {k: v for k, v in dataclasses.asdict(cfg).items()
                           if k not in ("eval_every", "checkpoint_every", "eval_batch_size")}}


@pytest.fixture
def saved(tmp_path):
    k = key()
    save_coefficients(saved_path(str(tmp_path), "lw_adamerging", k), torch.tensor([[1.0, 0.3, 0.3], [1.0, 0.2, 0.4]]),
                      method="lw_adamerging", model_name="ViT-B-32", tasks=["Cars", "DTD"],
                      param_names=["a", "b"], key=k)
    return str(tmp_path)


def test_the_same_inputs_reuse_the_file(saved):
    path, why = find_saved(saved, "lw_adamerging", key())
    assert path is not None and why == ""


@pytest.mark.parametrize("changed,field", [
    (key(digests={"pretrained": "aa", "Cars": "XX", "DTD": "cc"}), "checkpoints"),
    (key(steps=200), "adamerging"),
    (key(lr=5e-4), "adamerging"),
    (key(seed=1), "adamerging"),
])
def test_other_digests_steps_lr_or_seed_are_not_reused(saved, changed, field):
    path, why = find_saved(saved, "lw_adamerging", changed)
    assert path is None and "learned with other" in why and field in why
