"""TALL masks and Consensus merging (METHODS.md §2.13, §2.14, A.7).

From one multi-task vector τ_MTL (Σ_t τ_t, or TIES with K = 20 % and dis-sum; unscaled), each task
gets back its own model through a binary mask, computed as the original does on the weights:
  m_t(λ) = [ |θ0 − θ_t| > λ·|θ0 + τ_MTL − θ_t| ]   (= |τ_t| > λ·|τ_MTL − τ_t|, strict)
  θ̂_t   = θ0 + m_t ⊙ τ_MTL                        (coefficient 1)
λ_t ∈ {0.2, …, 0.6} is chosen per task on its …Val split (selection.py calls `tall_mask`).
Consensus keeps the weights that at least k tasks use: c = Σ_t m_t(λ_t), θ = θ0 + α·([c ≥ k] ⊙
τ_MTL); k = 2 drops "catastrophic" and "selfish" weights, k = 0 is TA/TIES, k > T is zero-shot.
Masks are stored bit-packed, one bit per parameter per task, next to τ_MTL.

`load_released_masks` reads the masks tall_masks released with its checkpoints instead
(`method.load_mask=True` there): `TALL_mask_<N>task.npy`, written by `np.save` of a dict
{task: np.packbits(flat mask)}, where the flat mask runs over *every* key of the pre-trained state
dict in sorted key order (tall_masks' `state_dict_to_vector`). The `.npy` holds a pickle; it is read
by the restricted unpickler (numpy arrays only), never by `np.load(allow_pickle=True)`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from taskmerge.merging import bitpack
from taskmerge.merging.task_vectors import (Experts, StateDict, TaskVector, apply, as_float, chunks,
                                            float_dtype, merged_keys, read_flat, shape_of,
                                            sum_of_task_vectors, validate)
from taskmerge.merging.ties import ties_delta
from taskmerge.storage.checkpoints import SafetensorsReader
from taskmerge.storage.safe_pickle import CheckpointError, load_npy

LAMS = (0.2, 0.3, 0.4, 0.5, 0.6)
FORMAT = "taskmerge.tall/1"


def multitask_vector(pretrained: StateDict, finetuned: Experts, use_ties: bool = False,
                     validate_inputs: bool = True, keys: list[str] | None = None
                     ) -> dict[str, torch.Tensor]:
    """τ_MTL: Σ_t τ_t, or with `use_ties` the TIES (K = 20 %, dis-sum) vector over TIES's flattened
    `keys` (zero on the other keys, which then keep θ0); never scaled."""
    if use_ties:
        tau = ties_delta(pretrained, finetuned, k=0.2, merge="dis-sum",
                         validate_inputs=validate_inputs, keys=keys)
        return {key: tau.pop(key) if key in tau else
                torch.zeros(shape_of(pretrained, key), dtype=float_dtype(pretrained, key))
                for key in merged_keys(pretrained)}
    if validate_inputs:
        validate(pretrained, finetuned)
    return sum_of_task_vectors(pretrained, finetuned).materialize()


def _mask_chunks(pretrained: StateDict, expert: StateDict, tau_mtl: Mapping[str, torch.Tensor],
                 lam: float):
    """(key, start, stop, m_t(λ) on that flat chunk) over every chunk of every key."""
    for key, tau in tau_mtl.items():
        tau_flat = tau.reshape(-1)
        for start, stop in chunks(tau_flat.numel()):
            theta0 = as_float(read_flat(pretrained, key, (start, stop)))
            theta_t = as_float(read_flat(expert, key, (start, stop)))
            # the original's float32 steps, in place on temporaries: |θ0 − θ_t| > |θ0 + τ − θ_t|·λ
            yield key, start, stop, ((theta0 - theta_t).abs_()
                                     > (theta0 + tau_flat[start:stop]).sub_(theta_t).abs_().mul_(lam))


def tall_mask(pretrained: StateDict, expert: StateDict, tau_mtl: Mapping[str, torch.Tensor],
              lam: float) -> dict[str, torch.Tensor]:
    """m_t(λ) for one expert θ_t, key by key (bool tensors)."""
    out = {key: torch.empty(tau.shape, dtype=torch.bool) for key, tau in tau_mtl.items()}
    for key, start, stop, mask in _mask_chunks(pretrained, expert, tau_mtl, lam):
        out[key].view(-1)[start:stop] = mask
    return out


@dataclass
class TallMasks:
    tasks: list[str]
    tau_mtl: Mapping[str, torch.Tensor]  # the multi-task vector, float32 (lazy when loaded)
    masks: dict[str, torch.Tensor]       # key -> (T, ceil(numel/8)) uint8, row t = task t
    lams: list[float]                    # λ_t each mask was built with
    use_ties: bool = False

    def mask(self, task: int | str) -> dict[str, torch.Tensor]:
        t = self.tasks.index(task) if isinstance(task, str) else task
        return {k: bitpack.unpack(self.masks[k][t], shape_of(self.tau_mtl, k))
                for k in self.tau_mtl}

    def task_delta(self, task: int | str) -> dict[str, torch.Tensor]:
        return {k: self.tau_mtl[k] * m for k, m in self.mask(task).items()}

    def task_state_dict(self, pretrained: StateDict, task: int | str) -> dict[str, torch.Tensor]:
        return apply(pretrained, self.task_delta(task), 1.0)

    def save(self, path: str) -> None:
        tensors = {f"tau_mtl/{k}": v for k, v in self.tau_mtl.items()}
        tensors.update({f"mask/{k}": v for k, v in self.masks.items()})
        bitpack.save_file(tensors, path, {"format": FORMAT, "tasks": self.tasks, "lams": self.lams,
                                          "keys": list(self.tau_mtl), "use_ties": self.use_ties})

    @classmethod
    def load(cls, path: str) -> "TallMasks":
        """The masks in memory; τ_MTL stays on disk and is read key by key when used (Consensus
        then holds the masks and its output, not a third model-sized tensor set)."""
        header, reader = bitpack.open_file(path, FORMAT)
        keys = header["keys"]
        tau_mtl = SafetensorsReader(path, rename={k: f"tau_mtl/{k}" for k in keys})
        return cls(header["tasks"], tau_mtl, {k: reader[f"mask/{k}"] for k in keys},
                   header["lams"], header["use_ties"])

    def storage_report(self) -> dict:
        # τ_MTL is float32 by construction (4 bytes), read from the header when loaded lazily
        dense = sum(torch.Size(shape_of(self.tau_mtl, k)).numel() * 4 for k in self.tau_mtl)
        per_task = sum(m[0].numel() for m in self.masks.values())
        return {"num_tasks": len(self.tasks), "shared_bytes": dense, "per_task_bytes": per_task,
                "dense_per_task_bytes": dense,
                "per_task_fraction": per_task / dense if dense else 0.0}


def tall_masks(pretrained: StateDict, finetuned: Experts, lams: float | Sequence[float],
               tau_mtl: Mapping[str, torch.Tensor] | None = None, use_ties: bool = False,
               validate_inputs: bool = True) -> TallMasks:
    """Every task's mask at its λ_t (one λ for all, or one per task in task order)."""
    lams = [float(lams)] * len(finetuned) if isinstance(lams, (int, float)) else list(lams)
    if len(lams) != len(finetuned):
        raise ValueError(f"{len(lams)} λ values for {len(finetuned)} tasks; give one per task")
    if tau_mtl is None:
        tau_mtl = multitask_vector(pretrained, finetuned, use_ties, validate_inputs)
    elif validate_inputs:
        validate(pretrained, finetuned)
    masks = {k: torch.empty(len(lams), (v.numel() + 7) // 8, dtype=torch.uint8)
             for k, v in tau_mtl.items()}
    for t, (expert, lam) in enumerate(zip(finetuned.values(), lams)):
        for key, start, stop, mask in _mask_chunks(pretrained, expert, tau_mtl, lam):
            masks[key][t, start // 8:(stop + 7) // 8] = bitpack.pack(mask)
    tau_mtl = {k: v.to(torch.float32) for k, v in tau_mtl.items()}
    return TallMasks(list(finetuned), tau_mtl, masks, lams, use_ties)


def released_mask_names(num_tasks: int, use_ties: bool) -> list[str]:
    """The file names tall_masks gives its masks; with TIES it loads `…_use_ties.npy` but saves
    `…_use_ties_<agg>.npy` (METHODS.md §2.13; agg "sum" by default), so both are accepted."""
    stem = f"TALL_mask_{num_tasks}task"
    return [f"{stem}_use_ties.npy", f"{stem}_use_ties_sum.npy"] if use_ties else [f"{stem}.npy"]


def load_released_masks(path: str, pretrained: StateDict, tau_mtl: Mapping[str, torch.Tensor],
                        tasks: Sequence[str], use_ties: bool = False) -> TallMasks:
    """The released masks of `tasks` (a file may hold more tasks than asked) as TallMasks over
    `tau_mtl`'s keys. Refused, naming the file: a payload that is not a dict of uint8 arrays, a
    missing task, or a mask whose length is not the model's parameter count over its sorted keys
    (masks of another model or checkpoint family)."""
    payload = load_npy(path)
    released = payload.item() if payload.dtype == object and payload.shape == () else payload
    if not isinstance(released, dict):
        raise CheckpointError(f"{path}: holds a {type(released).__name__}, expected tall_masks' dict "
                              f"{{task: np.packbits(mask)}}")
    missing = [t for t in tasks if t not in released]
    if missing:
        raise CheckpointError(f"{path}: no mask for {', '.join(missing)} (the file has "
                              f"{', '.join(map(str, released))}); it was made for other tasks: set "
                              f"load_mask=False to compute the masks, or give the file of these tasks")
    keys = sorted(pretrained.keys())
    sizes = [torch.Size(shape_of(pretrained, k)).numel() for k in keys]
    total = sum(sizes)
    masks = {k: torch.empty(len(tasks), (v.numel() + 7) // 8, dtype=torch.uint8) for k, v in tau_mtl.items()}
    for t, task in enumerate(tasks):
        packed = released[task]
        if not isinstance(packed, np.ndarray) or packed.dtype != np.uint8 or packed.ndim != 1:
            raise CheckpointError(f"{path}: the mask of {task} is a {type(packed).__name__} "
                                  f"{getattr(packed, 'dtype', '')}, expected a 1-D uint8 np.packbits array")
        if packed.size != (total + 7) // 8:
            raise CheckpointError(f"{path}: the mask of {task} has {packed.size} bytes ({8 * packed.size} "
                                  f"bits), but the model has {total} parameters over its {len(keys)} "
                                  f"keys ({(total + 7) // 8} bytes); these are masks of another model "
                                  f"or checkpoint family")
        flat = np.unpackbits(packed, count=total).view(np.bool_)
        offset = 0
        for key, size in zip(keys, sizes):
            if key in masks:  # τ_MTL skips non-float keys; their bits are not used
                masks[key][t] = bitpack.pack(torch.from_numpy(flat[offset:offset + size].copy()))
            offset += size
    tau_mtl = {k: v.to(torch.float32) for k, v in tau_mtl.items()}
    return TallMasks(list(tasks), tau_mtl, masks, [float("nan")] * len(tasks), use_ties)


def _consensus_at(tall: TallMasks, key: str, k: int) -> torch.Tensor:
    shape = shape_of(tall.tau_mtl, key)
    out = torch.empty(shape, dtype=torch.bool)
    flat = out.view(-1)
    for start, stop in chunks(flat.numel()):
        rows = tall.masks[key][:, start // 8:(stop + 7) // 8]
        count = sum(bitpack.unpack(row, (stop - start,)).to(torch.int32) for row in rows)
        flat[start:stop] = torch.as_tensor(count) >= k
    return out


def consensus_mask(tall: TallMasks, k: int = 2) -> dict[str, torch.Tensor]:
    """[Σ_t m_t ≥ k] per key: the weights at least k tasks' TALL masks select."""
    return {key: _consensus_at(tall, key, k) for key in tall.tau_mtl}


def consensus_merging(pretrained: StateDict, tall: TallMasks, alpha: float,
                      k: int = 2) -> dict[str, torch.Tensor]:
    """θ0 + α·(consensus mask ⊙ τ_MTL), key by key; α is chosen on the …Val splits like TA's λ."""
    masked = TaskVector(tall.tau_mtl, lambda key: tall.tau_mtl[key] * _consensus_at(tall, key, k))
    return apply(pretrained, masked, alpha)
