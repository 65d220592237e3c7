import pytest

from taskmerge.runs.config import configure, parse_overrides

DEFAULTS = {"lr": 1e-3, "steps": 500, "method": "ties", "tasks": [], "flag": False, "k": None}


def test_overrides_parse_to_the_default_types():
    out = parse_overrides(["--lr=0.01", "--steps=3", "--method=dis-mean", "--tasks=['MNIST','DTD']",
                           "--flag=True", "--k=0.2"], DEFAULTS)
    assert out == {"lr": 0.01, "steps": 3, "method": "dis-mean", "tasks": ["MNIST", "DTD"],
                   "flag": True, "k": 0.2}


def test_int_is_accepted_for_a_float_and_becomes_float():
    out = parse_overrides(["--lr=1"], DEFAULTS)
    assert out["lr"] == 1.0 and isinstance(out["lr"], float)


@pytest.mark.parametrize("arg", ["--nope=1", "--steps=abc", "--flag=1", "--steps=1.5", "lr=0.1"])
def test_bad_overrides_are_refused(arg):
    with pytest.raises(SystemExit):
        parse_overrides([arg], DEFAULTS)


def test_configure_updates_the_namespace_and_returns_every_hyperparameter():
    ns = {"lr": 0.1, "steps": 2, "CONSTANT": 3, "_private": 1, "module": pytest}
    config = configure(ns, ["--steps=7"])
    assert ns["steps"] == 7
    assert config == {"lr": 0.1, "steps": 7}
