"""The nanoGPT-style `--key=value` parser: overrides keep each variable's type, and anything else is
one ConfigError naming the argument."""
import pytest

from taskmerge.runs.config import configure, parse_overrides
from taskmerge.storage.errors import ConfigError, InputError

DEFAULTS = {"lr": 1e-3, "steps": 500, "method": "ties", "tasks": [], "flag": False, "k": None,
            "grid": (0.1, 0.2)}


def test_overrides_parse_to_the_default_types():
    out = parse_overrides(["--lr=0.01", "--steps=3", "--method=dis-mean", "--tasks=['MNIST','DTD']",
                           "--flag=True", "--k=0.2", "--grid=[0.5]"], DEFAULTS)
    assert out == {"lr": 0.01, "steps": 3, "method": "dis-mean", "tasks": ["MNIST", "DTD"],
                   "flag": True, "k": 0.2, "grid": (0.5,)}


def test_int_is_accepted_for_a_float_and_becomes_float():
    out = parse_overrides(["--lr=1"], DEFAULTS)
    assert out["lr"] == 1.0 and isinstance(out["lr"], float)


def test_dashes_in_a_key_mean_underscores_and_a_bare_word_is_a_string():
    out = parse_overrides(["--method=dis-max"], DEFAULTS)
    assert out == {"method": "dis-max"}
    assert parse_overrides(["--lr=1e-4"], {"lr": 1e-3, "save_dir": ""}) == {"lr": 1e-4}
    assert parse_overrides(["--save-dir="], {"save_dir": "x"}) == {"save_dir": ""}


@pytest.mark.parametrize("arg,named", [("--nope=1", "--nope"), ("--steps=abc", "--steps=abc"),
                                       ("--flag=1", "--flag=1"), ("--steps=1.5", "--steps=1.5"),
                                       ("--steps=True", "--steps=True"), ("lr=0.1", "lr=0.1"),
                                       ("--lr", "--lr")])
def test_bad_overrides_are_one_config_error_naming_the_argument(arg, named):
    with pytest.raises(ConfigError, match=named.replace("+", r"\+")) as err:
        parse_overrides([arg], DEFAULTS)
    assert isinstance(err.value, InputError) and "\n" not in str(err.value)


def test_configure_updates_the_namespace_and_returns_every_hyperparameter(capsys):
    ns = {"lr": 0.1, "steps": 2, "CONSTANT": 3, "_private": 1, "module": pytest}
    config = configure(ns, ["--steps=7"])
    assert ns["steps"] == 7
    assert config == {"lr": 0.1, "steps": 7}
    assert "Overriding: steps = 7" in capsys.readouterr().out


def test_auto_and_a_value_of_its_setting_replace_each_other():
    defaults = {"rank": "auto", "num_workers": 4, "method": "ties"}
    assert parse_overrides(["--rank=4", "--num_workers=auto"], defaults) == {"rank": 4, "num_workers": "auto"}
    with pytest.raises(ConfigError, match="--method=3"):
        parse_overrides(["--method=3"], defaults)
