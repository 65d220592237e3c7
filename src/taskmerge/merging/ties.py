"""TIES-Merging (METHODS.md §2.3): Trim, Elect sign, Disjoint merge.

The originals work on the T × D matrix of flattened task vectors; each step here, key by key:
- Trim is global per task: k_th = D − int(D·k); keep entries with |τ_t| ≥ the k_th-th smallest |τ_t|
  of the whole flattened τ_t (ties kept). That value is found by an in-place selection
  (introselect) in one reusable buffer of D floats, not by sorting or stacking T rows.
- Elect: sign of the summed trimmed mass; where it is 0, the majority sign = sign(Σ_p sign_p), one
  scalar over the whole model, hence a first pass that stores the elected signs as int8.
- Disjoint merge: per task keep the trimmed entries whose sign equals the elected one (zeros drop
  out), then dis-sum, dis-mean (sum / max(1, count of kept)) or dis-max (elected sign × max |kept|).
θ = θ0 + λ·merged. Because keys never mix, sorted-key flattening order does not matter.

`keys` names the keys flattened into the trim's quantile and the majority sign (None: every
floating-point key, as the originals flatten task_vectors' whole checkpoint, text leftovers included);
FusionBench flattens its CLIPVisionModel's state dict only (`ties_merging.py`: `state_dict_to_vector`
of `model.state_dict()`, `remove_keys: []`), and keys outside `keys` keep θ0.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch

from taskmerge.merging.task_vectors import (Experts, Span, StateDict, apply, as_float, chunks, float_dtype,
                                            flattened_keys, numel_of, read_flat, shape_of, task_magnitudes,
                                            taus_at, validate)

MERGES = ("dis-sum", "dis-mean", "dis-max")
PRESETS = {
    # main_ties_merging.py, Surgery `ties_merging`, AdaMerging++: no validation search.
    "ennengyang": {"k": 0.2, "merge": "dis-sum", "lam": 0.3},
    # tall_masks/TSV `method=ties`: λ on the …Val splits (lam=None: selection.py picks it). Their
    # config default is method.k=100 (no trimming) but the README runs method.k=20; we take 20 %.
    "tall_masks": {"k": 0.2, "merge": "dis-mean", "lam": None},
}


def trim_thresholds(pretrained: StateDict, finetuned: Experts, k: float,
                    keys: list[str] | None = None) -> list[float]:
    """Per task, the smallest |τ_t| the global top-k trim keeps over `keys` (0.0 when k = 1)."""
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k={k}: k is the kept fraction in (0, 1], e.g. 0.2 for the top 20 %")
    if k == 1.0:  # tall_masks' method.k=100 skips the trim entirely
        return [0.0] * len(finetuned)
    keys = flattened_keys(pretrained, keys)
    dim = sum(numel_of(pretrained, key) for key in keys)
    kth = dim - int(dim * k)
    thresholds = []
    for magnitudes in task_magnitudes(pretrained, finetuned, keys):
        flat = magnitudes.numpy()
        flat.partition(kth - 1)  # the kth-th smallest lands at index kth-1, as kthvalue(kth)
        thresholds.append(float(flat[kth - 1]))
    return thresholds


def trim(tau: torch.Tensor, threshold: float) -> torch.Tensor:
    """τ where |τ| ≥ threshold, else 0. hardshrink keeps |τ| > λ; with λ the float just below
    the threshold that is |τ| ≥ threshold (ties kept), in one fused pass."""
    below = torch.nextafter(torch.tensor(threshold, dtype=tau.dtype),
                            torch.tensor(-float("inf"), dtype=tau.dtype))
    return torch.nn.functional.hardshrink(tau, float(below))


def elected_signs(pretrained: StateDict, finetuned: Experts, thresholds: list[float],
                  keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """sign(Σ_t trimmed_t) per key as int8, zeros replaced by the majority sign over `keys`."""
    signs, votes = {}, 0
    for key in flattened_keys(pretrained, keys):
        sign = torch.empty(shape_of(pretrained, key), dtype=torch.int8)
        flat = sign.view(-1)
        for start, stop in chunks(flat.numel()):
            taus = taus_at(as_float(read_flat(pretrained, key, (start, stop))), finetuned, key,
                           (start, stop))
            mass = None
            for tau, thr in zip(taus, thresholds):
                mass = trim(tau, thr) if mass is None else mass.add_(trim(tau, thr))
            torch.sign(mass, out=mass)
            flat[start:stop] = mass
        signs[key] = sign
        votes += int(sign.sum(dtype=torch.int64))
    majority = (votes > 0) - (votes < 0)
    for sign in signs.values():
        sign[sign == 0] = majority
    return signs


def selected_chunks(pretrained: StateDict, finetuned: Experts, k: float, keys: list[str] | None = None
                    ) -> Iterator[tuple[str, Span, torch.Tensor, Iterator[torch.Tensor]]]:
    """(key, span, elected sign of that chunk, the T selected chunks one at a time), over every
    flat chunk of every key of `keys` in order."""
    keys = flattened_keys(pretrained, keys)
    thresholds = trim_thresholds(pretrained, finetuned, k, keys)
    signs = elected_signs(pretrained, finetuned, thresholds, keys)
    for key in keys:
        sign = signs.pop(key).view(-1)
        for span in chunks(sign.numel()):
            theta0 = as_float(read_flat(pretrained, key, span))
            chunk_sign = sign[span[0]:span[1]]
            # Keeping τ where sign(τ) = elected sign is clamp(τ·d, min=0)·d with d = ±1; d = −1
            # also where the elected sign is 0 (majority 0), as the originals' `τ < 0` branch does.
            direction = torch.where(chunk_sign > 0, 1.0, -1.0).to(theta0.dtype)
            trimmed = (trim(tau, thr) for tau, thr in
                       zip(taus_at(theta0, finetuned, key, span), thresholds))
            yield key, span, chunk_sign, (t.mul_(direction).clamp_(min=0).mul_(direction)
                                          for t in trimmed)


def disjoint_merge(selected: Iterable[torch.Tensor], sign: torch.Tensor, merge: str
                   ) -> torch.Tensor:
    total = count = biggest = None
    for sel in selected:
        if merge == "dis-max":
            biggest = sel.abs() if biggest is None else torch.maximum(biggest, sel.abs())
            continue
        total = sel if total is None else total.add_(sel)
        if merge == "dis-mean":
            kept = (sel != 0).to(torch.int32)
            count = kept if count is None else count + kept
    if merge == "dis-sum":
        return total
    if merge == "dis-mean":
        return total / torch.clamp(count, min=1)
    return biggest * sign


def ties_delta(pretrained: StateDict, finetuned: Experts, k: float = 0.2, merge: str = "dis-sum",
               validate_inputs: bool = True, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The unscaled TIES task vector over `keys` (TALL masks and Consensus use it with dis-sum)."""
    if merge not in MERGES:
        raise ValueError(f"merge={merge!r}: expected one of {MERGES}")
    if validate_inputs:
        validate(pretrained, finetuned)
    out = {}
    for key, (start, stop), sign, selected in selected_chunks(pretrained, finetuned, k, keys):
        if key not in out:
            out[key] = torch.empty(shape_of(pretrained, key), dtype=float_dtype(pretrained, key))
        out[key].view(-1)[start:stop] = disjoint_merge(selected, sign, merge)
    return out


def ties_merging(pretrained: StateDict, finetuned: Experts, k: float = 0.2,
                 merge: str = "dis-sum", lam: float | None = 0.3,
                 validate_inputs: bool = True, keys: list[str] | None = None) -> dict[str, torch.Tensor]:
    """θ0 + lam·TIES(τ_1..τ_T). Presets: `ties_merging(θ0, experts, **PRESETS["ennengyang"])`."""
    if lam is None:
        raise ValueError("lam=None: the tall_masks preset chooses λ on the …Val splits "
                         "(selection.py); pass lam explicitly to merge with a fixed λ")
    return apply(pretrained, ties_delta(pretrained, finetuned, k, merge, validate_inputs, keys), lam,
                 consume=True)


def ties_selected(pretrained: StateDict, finetuned: Experts, k: float = 0.2,
                  validate_inputs: bool = True, keys: list[str] | None = None
                  ) -> dict[str, dict[str, torch.Tensor]]:
    """Per task, its trimmed entries that agree with the elected sign (`ties_merging_split`):
    the "TIES task vectors" of AdaMerging++ and TIES+Surgery; their sum is the dis-sum merge.
    With `keys`, the trim and the election range over those keys and every other floating key's
    vector is zero (it keeps θ0), as in `ties_delta`."""
    if validate_inputs:
        validate(pretrained, finetuned)
    out: dict[str, dict[str, torch.Tensor]] = {task: {} for task in finetuned}
    if keys is not None:
        chosen = set(keys)
        for key in flattened_keys(pretrained, None):
            if key not in chosen:
                for task in finetuned:
                    out[task][key] = torch.zeros(shape_of(pretrained, key), dtype=float_dtype(pretrained, key))
    for key, (start, stop), _, selected in selected_chunks(pretrained, finetuned, k, keys):
        for task, sel in zip(finetuned, selected):
            if key not in out[task]:
                out[task][key] = torch.empty(shape_of(pretrained, key),
                                             dtype=float_dtype(pretrained, key))
            out[task][key].view(-1)[start:stop] = sel
    return out
