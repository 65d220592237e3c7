"""What a script setting may be, and the one place where every setting is checked.

A typed config is a dataclass whose fields are all declared with `setting(...)`: the annotation is
the type (`int`, `float | None`, `list[str]`, …) and the metadata the range or the choices. Fields
have no defaults on purpose: a script's variables are the only defaults, so `from_values` refuses a
script that misses a field or carries one the config does not know, naming it. `check` then tests
every field against its declaration (and the config's own `check_together`, for rules between
fields) and raises one `ConfigError` naming the setting, the value and what is allowed, before any
work starts.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Mapping

from taskmerge.storage.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Rule:
    """The range or choices of one setting (None: unconstrained)."""
    choices: tuple | None = None
    ge: float | None = None        # value >= ge
    gt: float | None = None        # value > gt
    le: float | None = None        # value <= le
    lt: float | None = None        # value < lt
    finite: bool = False           # floats: no inf / nan
    nonempty: bool = False         # strings and lists
    unique: bool = False           # lists: no repeated item
    suffix: str | None = None      # strings outside `choices` must end with it (e.g. ".json")
    words: tuple | None = None     # strings accepted in place of a value of the type (e.g. "auto")


def setting(**rule) -> Any:
    """A required dataclass field with its Rule (`choices=`, `ge=`, `gt=`, `le=`, `finite=`, …)."""
    return dataclasses.field(metadata={"rule": Rule(**{k: tuple(v) if k in ("choices", "words") else v
                                                       for k, v in rule.items()})})


def _allowed(hint, rule: Rule) -> str:
    parts = []
    if rule.choices is not None:
        parts.append("one of " + ", ".join(repr(c) for c in rule.choices))
        if rule.suffix:
            parts[-1] += f", or a path ending in {rule.suffix}"
    else:
        parts.append(_type_name(hint))
    bounds = [f">= {rule.ge}" if rule.ge is not None else "", f"> {rule.gt}" if rule.gt is not None else "",
              f"<= {rule.le}" if rule.le is not None else "", f"< {rule.lt}" if rule.lt is not None else "",
              "finite" if rule.finite else "",
              "non-empty" if rule.nonempty else "", "without repeats" if rule.unique else ""]
    if any(bounds):
        parts.append(", ".join(b for b in bounds if b))
    if rule.words:
        parts.append("or " + " or ".join(repr(w) for w in rule.words))
    return "; ".join(parts)


def _type_name(hint) -> str:
    if hint is type(None):
        return "None"
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is list:
        item = typing.get_args(hint)[0]
        return "a list of " + {str: "strings", int: "ints", float: "floats"}.get(item, str(item))
    return {bool: "True or False", int: "an int", float: "a float", str: "a string"}.get(hint, str(hint))


class _Refused(Exception):
    """A value does not fit its type or rule (the caller adds the setting's name)."""


def _convert(value, hint, rule: Rule, top: bool = True):
    """`value` as `hint` (an int is accepted for a float), or _Refused."""
    if top and rule.words and isinstance(value, str) and value in rule.words:
        return value
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        for other in (a for a in typing.get_args(hint) if a is not type(None)):
            try:  # the first alternative that takes the value (`list[str] | str`: a list, or a name)
                return _convert(value, other, rule, top)
            except _Refused:
                pass
        raise _Refused
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _Refused
        items = [_convert(v, typing.get_args(hint)[0], rule, top=False) for v in value]
        if (rule.nonempty and not items) or (rule.unique and len(set(items)) != len(items)):
            raise _Refused
        return items
    if hint is bool:
        if not isinstance(value, bool):
            raise _Refused
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Refused
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Refused
        value = float(value)
        if rule.finite and not math.isfinite(value):
            raise _Refused
    elif hint is str:
        if not isinstance(value, str) or (rule.nonempty and not value):
            raise _Refused
    if hint in (int, float):
        if ((rule.ge is not None and not value >= rule.ge) or (rule.gt is not None and not value > rule.gt)
                or (rule.le is not None and not value <= rule.le)
                or (rule.lt is not None and not value < rule.lt)):
            raise _Refused
    if rule.choices is not None and value not in rule.choices:
        if not (rule.suffix and isinstance(value, str) and value.endswith(rule.suffix)):
            raise _Refused
    return value


def check(config, source: str = "the script") -> None:
    """Every field of `config` against its type and Rule, then `config.check_together()`; fields
    are normalized in place (an int given for a float becomes a float, a tuple a list)."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        rule = f.metadata.get("rule")
        if rule is None:
            raise TypeError(f"{type(config).__name__}.{f.name} is not declared with setting(...)")
        value = getattr(config, f.name)
        try:
            object.__setattr__(config, f.name, _convert(value, hints[f.name], rule))
        except _Refused:
            raise ConfigError(f"{source}: setting {f.name}={value!r} is not allowed: expected "
                              f"{_allowed(hints[f.name], rule)}") from None
    together = getattr(config, "check_together", None)
    if together is not None:
        together()


def from_values(cls, values: Mapping[str, Any], source: str = "the script"):
    """`cls` built from a script's variables, refused (ConfigError) when one is missing or unknown
    or any value is out of its type, range or choices."""
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ConfigError(f"{source} sets {', '.join(unknown)}, which {cls.__name__} does not know "
                          f"(a misspelling?); its settings are: {', '.join(names)}")
    missing = [n for n in names if n not in values]
    if missing:
        raise ConfigError(f"{source} does not set {', '.join(missing)}: add "
                          f"{'it' if len(missing) == 1 else 'them'} at the top of the script "
                          f"(every setting of {cls.__name__} has its default there)")
    config = cls(**{n: values[n] for n in names})
    check(config, source)
    return config


def subset(cls, values: Mapping[str, Any] | object, source: str, fixed: Mapping[str, Any] | None = None):
    """`cls` from the fields of `values` (a mapping or a config) that `cls` declares, with `fixed`
    filling the ones `values` leaves None or lacks; checked like `from_values`."""
    get = values.get if isinstance(values, Mapping) else (lambda n: getattr(values, n, None))
    fixed = dict(fixed or {})
    picked = {}
    for f in dataclasses.fields(cls):
        value = get(f.name)
        picked[f.name] = fixed[f.name] if value is None and f.name in fixed else value
    return from_values(cls, picked, source)
