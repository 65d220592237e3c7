"""AdaMerging coefficient tables: the published ones (shipped as data) and learned ones (saved/loaded).

A table has rows [1.0, λ_1 … λ_T] (column 0 multiplies θ0 and is always 1.0): one row for a
task-wise table, one per state-dict tensor (in `param_names` order) for a layer-wise one. The
published tables (EnnengYang/AdaMerging `merging_cofficient.py`, METHODS.md §2.4–2.7) are keyed
`<method>/<model>` as in the AdaMerging README's Eval section, e.g. `lw_adamerging/ViT-B-32`.
"""
from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass
from typing import Sequence

import torch

from taskmerge.adaptive.training_state import differing_fields, run_hash
from taskmerge.storage import atomic
from taskmerge.storage.errors import InputError

PUBLISHED_PATH = os.path.join(os.path.dirname(__file__), "data", "adamerging_coefficients.json")
PUBLISHED_METHODS = ("tw_adamerging", "tw_adamergingpp", "lw_adamerging", "lw_adamergingpp")


@dataclass
class CoefficientTable:
    method: str
    model_name: str
    task_order: list[str]
    rows: torch.Tensor                 # R × (1 + T)
    param_names: list[str] | None      # R names for a layer-wise table
    source: str = "coefficients"
    key: dict | None = None            # what a learned table was learned from (see `find_saved`)

    def __post_init__(self):
        self.rows = torch.as_tensor(self.rows, dtype=torch.float32)
        if self.rows.dim() != 2 or self.rows.shape[1] != len(self.task_order) + 1:
            raise InputError(f"{self.source}: rows must be R × (1 + {len(self.task_order)} tasks), "
                             f"got {tuple(self.rows.shape)}")
        if not bool(torch.isfinite(self.rows).all()):
            raise InputError(f"{self.source}: the coefficients hold NaN/Inf values; learn them again "
                             f"(coefficients=\"learn\") or fix the file")
        if not torch.all(self.rows[:, 0] == 1.0):
            raise InputError(f"{self.source}: column 0 (pre-trained coefficient) must be 1.0 in every row")
        if self.mode == "layer" and self.param_names is not None and len(self.param_names) != len(self.rows):
            raise InputError(f"{self.source}: {len(self.rows)} rows but {len(self.param_names)} param_names")

    @property
    def mode(self) -> str:
        return "task" if len(self.rows) == 1 else "layer"

    @property
    def lam(self) -> torch.Tensor:
        return self.rows[:, 1:]

    def lam_for(self, tasks: Sequence[str]) -> torch.Tensor:
        """λ with its columns in the order of `tasks` (rows × len(tasks))."""
        missing = [t for t in tasks if t not in self.task_order]
        if missing:
            raise InputError(f"{self.source}: no coefficients for tasks {missing}; the table covers "
                             f"{self.task_order}")
        return self.lam[:, [self.task_order.index(t) for t in tasks]]

    def check_param_names(self, names: Sequence[str]) -> None:
        if self.mode == "task":
            return
        if len(self.rows) != len(names):
            raise InputError(
                f"{self.source}: {len(self.rows)} layer-wise rows but the encoder has {len(names)} "
                f"state-dict tensors; this table belongs to {self.model_name}; build the encoder with "
                f"taskmerge.models.encoders.build_image_encoder({self.model_name!r})")
        if self.param_names is not None:
            for j, (a, b) in enumerate(zip(self.param_names, names)):
                if a != b:
                    raise InputError(
                        f"{self.source}: row {j} is {a!r} but the encoder's tensor {j} is {b!r}; rows "
                        f"follow state-dict order of open_clip's {self.model_name} ImageEncoder")


def load_published(method: str, model_name: str, path: str = PUBLISHED_PATH) -> CoefficientTable:
    """The published table `<method>/<model_name>`, e.g. ("lw_adamerging", "ViT-B-32")."""
    if method not in PUBLISHED_METHODS:
        raise InputError(f"unknown AdaMerging method {method!r}; published tables exist for "
                         f"{PUBLISHED_METHODS}")
    with open(path) as f:
        data = json.load(f)
    key = f"{method}/{model_name}"
    if key not in data["coefficients"]:
        have = sorted(k for k in data["coefficients"] if k.startswith(method + "/"))
        raise InputError(
            f"{path}: no published {method} table for model {model_name!r} (published: {have}); "
            f"learn the coefficients with taskmerge.adamerging.train_adamerging and load them with "
            f"load_coefficients(path) instead")
    return CoefficientTable(method, model_name, list(data["task_order"]), data["coefficients"][key],
                            data["param_names"].get(model_name), source=f"{path} [{key}]")


def save_coefficients(path: str, rows: torch.Tensor, *, method: str, model_name: str,
                      tasks: Sequence[str], param_names: Sequence[str] | None = None,
                      key: dict | None = None) -> None:
    """Write learned rows (R × (1+T), e.g. `MergedEncoder.coefficient_rows()`) as JSON, atomically,
    with the `key` of everything they were learned from (checkpoints, heads, data, settings).
    float32 → Python float → float32 is exact, so loading gives back the same tensor bit for bit."""
    table = CoefficientTable(method, model_name, list(tasks), rows,
                             list(param_names) if param_names is not None and len(rows) > 1 else None)
    atomic.write_json(path, {"method": method, "model": model_name, "task_order": table.task_order,
                             "param_names": table.param_names, "coefficients": table.rows.tolist(),
                             "key": key})


def load_coefficients(path: str) -> CoefficientTable:
    if not os.path.exists(path):
        raise InputError(f"{path}: no coefficient file; run AdaMerging first or give the right path")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot be read as a coefficient file ({type(e).__name__}: {e}); "
                         f"learn the coefficients again or give another file") from None
    if not isinstance(data, dict):
        raise InputError(f"{path}: not a coefficient file (a JSON {type(data).__name__}); expected a "
                         f"file written by save_coefficients")
    for k in ("method", "model", "task_order", "coefficients"):
        if k not in data:
            raise InputError(f"{path}: missing key {k!r}; expected a file written by save_coefficients")
    return CoefficientTable(data["method"], data["model"], list(data["task_order"]), data["coefficients"],
                            data.get("param_names"), source=path, key=data.get("key"))


def saved_path(folder: str, method: str, key: dict) -> str:
    """Where coefficients learned from `key` are saved: one file per set of inputs, so a run with
    another prior, step count or head never overwrites (or reuses) them."""
    return os.path.join(folder, f"{method}_{run_hash('coefficients', key)}.json")


def find_saved(folder: str, method: str, key: dict) -> tuple[str | None, str]:
    """(path, "") of coefficients saved for exactly `key`, else (None, why none was reused)."""
    path = saved_path(folder, method, key)
    wanted = json.loads(json.dumps(key, sort_keys=True, default=str))
    if os.path.exists(path):
        try:
            stored = load_coefficients(path).key
        except InputError as e:  # a saved file that cannot be read is a miss: learn again
            return None, f"{path} cannot be read ({str(e).split(': ', 1)[-1].split(';')[0]})"
        if stored == wanted:
            return path, ""
        return None, f"{path} was saved for other inputs"
    others = sorted(glob.glob(os.path.join(glob.escape(folder), f"{method}*.json")), key=os.path.getmtime)
    if not others:
        return None, f"none saved in {folder}"
    try:
        stored = load_coefficients(others[-1]).key
    except InputError:
        return None, f"none readable for these inputs in {folder}"
    if not isinstance(stored, dict):
        return None, f"{others[-1]} records no inputs (saved by an older version)"
    return None, f"{others[-1]} was learned with other {', '.join(differing_fields(stored, wanted))}"

