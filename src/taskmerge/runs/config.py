"""`--key=value` overrides for the plain variables at the top of an entry script (nanoGPT style).

`configure(globals())` applies the overrides to a script's variables: every override must name an
existing variable and parse to that variable's type (else a ConfigError naming it), and the resolved
variables are returned; runs/cli.py then builds them into the script's typed config, which checks
ranges and choices (runs/settings.py), and the run logs all of it before doing anything.
"""
from __future__ import annotations

import ast
import sys
from typing import Any, Sequence

from taskmerge.storage.errors import ConfigError


def _is_hyperparameter(name: str, value: Any) -> bool:
    return (not name.startswith("_") and name.islower()
            and isinstance(value, (bool, int, float, str, list, tuple, dict, type(None))))


def _wrong_type(key: str, raw: str, default: Any) -> ConfigError:
    return ConfigError(f"--{key}={raw}: expected {type(default).__name__}, like its default {default!r}")


def parse_overrides(argv: Sequence[str], defaults: dict[str, Any]) -> dict[str, Any]:
    """Return {name: value} for `--name=value` arguments, checked against `defaults`."""
    out: dict[str, Any] = {}
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ConfigError(f"argument {arg!r}: expected --key=value (keys: {', '.join(sorted(defaults))})")
        key, raw = arg[2:].split("=", 1)
        key = key.replace("-", "_")
        if key not in defaults:
            raise ConfigError(f"--{key}: unknown setting; known settings: {', '.join(sorted(defaults))}")
        default = defaults[key]
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare string such as --method=ties
        # "auto" stands in for a value of another type (rank = "auto" or 4): the typed config checks it
        if default is not None and value is not None and "auto" not in (default, value):
            if isinstance(default, bool) != isinstance(value, bool):
                raise _wrong_type(key, raw, default)
            if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
                value = type(default)(value)
            # a list setting may also take a name (tasks="TALL20") and back: the typed config,
            # which knows the setting's declared type, accepts or refuses it
            swappable = isinstance(default, (list, tuple, str)) and isinstance(value, (list, tuple, str))
            if not isinstance(value, type(default)) and not swappable:
                raise _wrong_type(key, raw, default)
        out[key] = value
    return out


def script_variables(path: str) -> dict[str, Any]:
    """The plain `name = <literal>` variables at the top of the entry script `path`, read without
    running it (a Surgery run takes its base's defaults from the base's own script)."""
    try:
        with open(path) as f:
            tree = ast.parse(f.read(), path)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read this entry script ({e.strerror or e}); a method's "
                          f"declaration names its script, which holds its settings' defaults") from None
    out = {}
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                continue
            if _is_hyperparameter(node.targets[0].id, value):
                out[node.targets[0].id] = value
    return out


def configure(namespace: dict[str, Any], argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Apply `--key=value` overrides to a script's globals and return the full configuration."""
    defaults = {k: v for k, v in namespace.items() if _is_hyperparameter(k, v)}
    overrides = parse_overrides(sys.argv[1:] if argv is None else argv, defaults)
    for key, value in overrides.items():
        print(f"Overriding: {key} = {value!r}")
    namespace.update(overrides)
    return {k: namespace[k] for k in defaults}
