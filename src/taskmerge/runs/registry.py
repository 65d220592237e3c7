"""Every merge method, declared once: what the runs, the reports and the Surgery bases know of it.

A method is one `Method(...)` passed to `declare`, next to its merge function (the built-in ones
live in runs/methods/, one file each; docs/ADDING_A_METHOD.md shows a new one). The runs read the
declaration instead of knowing each method: `run_data_free` calls its `merge`, a Surgery run takes
any of its `bases`, the run's closing table and `summarize_results.py` print its `label`, the
refusal of a NaN merge names its `coefficient_keys`, and the cache keys of what a merge feeds (saved
merges, Surgery's resume state) take every setting it reports except its `derived` fields.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from taskmerge.storage.errors import ConfigError


def _never(report: dict) -> bool:
    return False


@dataclass(frozen=True)
class Method:
    """One merge method.

    name: the report's `method` (and the data-free config's `method_key`).
    settings: a dataclass of its own settings, each declared with `runs.settings.setting(...)`
        (type, range or choices; a comment gives its one-line doc). Their defaults are the plain
        variables at the top of `script`, never here.
    merge: `merge(run, settings) -> runs.data_free.Merge` (the run's experts are `run.experts()`).
    label: `label(report) -> str`, the row name of a report's run, read from the report's fields.
    script: its entry script (a file name beside the other `src/main_*.py`, or a path), whose
        variables are the defaults a Surgery run on it takes.
    bases: the Surgery base names it answers to → the settings each name fixes (e.g. the
        `iso_cts` base of Iso is `{"method": "iso_cts"}`); empty: it is no Surgery base.
    task_identity: whether a report's run evaluated task t with task t's own model (EMR, TALL
        masks, TSV-C), from the report.
    coefficient_keys: the report fields a refusal of a NaN merge names (its coefficients).
    derived: report fields computed from the inputs (search curves, histories) that stay out of
        cache keys and saved files' names.
    surgery_base: `(run, settings, test images) -> ({task: encoder}, report fields)` for a method
        whose merge learns on the test images (AdaMerging); None: a Surgery base is its `merge`.
    """
    name: str
    settings: type
    merge: Callable[[Any, Any], Any]
    label: Callable[[dict], str]
    script: str
    bases: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    task_identity: Callable[[dict], bool] = _never
    coefficient_keys: tuple[str, ...] = ()
    derived: tuple[str, ...] = ()
    surgery_base: Callable[[Any, Any, Any], tuple] | None = None

    @property
    def stem(self) -> str:
        """The entry script's name without `main_` and `.py` (TaskArithmetic): its config classes'."""
        stem = os.path.splitext(os.path.basename(self.script))[0]
        return stem[len("main_"):] if stem.startswith("main_") else stem

    def __post_init__(self):
        if not dataclasses.is_dataclass(self.settings):
            raise TypeError(f"method {self.name!r}: settings must be a dataclass of setting(...) fields")
        names = {f.name for f in dataclasses.fields(self.settings)}
        for base, fixed in self.bases.items():
            unknown = set(fixed) - names
            if unknown:
                raise TypeError(f"method {self.name!r}: base {base!r} fixes {sorted(unknown)}, which "
                                f"are not its settings")


METHODS: dict[str, Method] = {}
# Report fields every method derives from its inputs, never a setting.
DERIVED = ("val_curve", "storage")


def declare(method: Method) -> Method:
    """Register `method` (a second declaration of one name replaces the first, so that a notebook or
    a test may redeclare it) and return it. A base name already taken by another method is refused."""
    for other in METHODS.values():
        if other.name != method.name:
            taken = set(other.bases) & set(method.bases)
            if taken:
                raise ValueError(f"method {method.name!r}: Surgery base names {sorted(taken)} are "
                                 f"already {other.name!r}'s")
    METHODS[method.name] = method
    return method


def method(name: str) -> Method:
    """The declared method `name` (ConfigError naming the declared ones otherwise)."""
    if name not in METHODS:
        raise ConfigError(f"method {name!r} is not declared; declared: {', '.join(sorted(METHODS))} "
                          f"(a method of your own is declared with runs.registry.declare, "
                          f"docs/ADDING_A_METHOD.md)")
    return METHODS[name]


def bases() -> dict[str, tuple[Method, Mapping[str, Any]]]:
    """Every Surgery base name → (its method, the settings the name fixes)."""
    return {base: (m, fixed) for m in METHODS.values() for base, fixed in m.bases.items()}


def base(name: str) -> tuple[Method, Mapping[str, Any]]:
    """(method, fixed settings) of the Surgery base `name`."""
    known = bases()
    if name not in known:
        raise ConfigError(f"setting method_name={name!r}: not a Surgery base; the bases are "
                          f"{', '.join(sorted(known))}")
    return known[name]


def declared(name: str) -> Method | None:
    """The method `name` names: a method's own name or one of its Surgery base names."""
    if name in METHODS:
        return METHODS[name]
    found = bases().get(name)
    return found[0] if found else None


def derived_fields(name: str | None) -> tuple[str, ...]:
    """The report fields of the method `name` names that are no setting (DERIVED and its own)."""
    method = declared(name) if name else None
    return DERIVED + (tuple(method.derived) if method else ())
