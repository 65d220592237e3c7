"""EMR-Merging (METHODS.md §2.10, A.5): Elect, Mask, Rescale; tuning-free and data-free.

Per key n, elementwise over tasks:
  s_n     = +1 where mean_t τ_t,n > 0, else −1           (exact zeros elect −1)
  M_t,n   = [τ_t,n · s_n > 0]                              (task agrees with s and is non-zero)
  τ_uni,n = s_n · max_t |M_t,n ⊙ τ_t,n|
  λ_t     = Σ_n mean|τ_t,n| / Σ_n mean|M_t,n ⊙ τ_uni,n|    (rescaler="code": per-tensor means)
          = Σ |τ_t| / Σ |M_t ⊙ τ_uni|                       (rescaler="paper": whole-vector sums)
Task t's model is θ0 + λ_t·(M_t ⊙ τ_uni): one shared τ_uni, one bit-packed mask and one float per
task, never T dense models. The rescaler sums are accumulated in float64 (the code used float32).
The code's per-tensor means depend on what a tensor is: open_clip's fused `attn.in_proj_*` is one
(the original); FusionBench's CLIPVisionModel has q_proj, k_proj and v_proj, three tensors whose
means its `emr_merging/utils.py` `emr_merge` adds up (`qkv="separate"`: Σ of the three block means
= the fused key's sum over numel/3). Masks and τ_uni are elementwise and do not change.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from taskmerge.merging import bitpack
from taskmerge.merging.task_vectors import (Experts, StateDict, apply, as_float, chunks, merged_keys,
                                            numel_of, qkv_parts, read_flat, shape_of, taus_at, validate)

RESCALERS = ("code", "paper")
FORMAT = "taskmerge.emr/1"


@dataclass
class EMRMerged:
    tasks: list[str]
    tau_uni: dict[str, torch.Tensor]      # unified task vector, float32
    masks: dict[str, torch.Tensor]        # key -> (T, ceil(numel/8)) uint8, row t = task t
    rescalers: torch.Tensor               # (T,) float32
    rescaler: str = "code"

    def task_delta(self, task: int | str) -> dict[str, torch.Tensor]:
        """λ_t·(M_t ⊙ τ_uni), multiplied in the code's order: (τ_uni·M_t)·λ_t."""
        t = self.tasks.index(task) if isinstance(task, str) else task
        return {key: uni * bitpack.unpack(self.masks[key][t], uni.shape) * self.rescalers[t]
                for key, uni in self.tau_uni.items()}

    def task_state_dict(self, pretrained: StateDict, task: int | str) -> dict[str, torch.Tensor]:
        return apply(pretrained, self.task_delta(task), 1.0)

    def save(self, path: str) -> None:
        tensors = {"rescalers": self.rescalers}
        tensors.update({f"tau_uni/{k}": v for k, v in self.tau_uni.items()})
        tensors.update({f"mask/{k}": v for k, v in self.masks.items()})
        bitpack.save_file(tensors, path, {"format": FORMAT, "tasks": self.tasks,
                                          "keys": list(self.tau_uni), "rescaler": self.rescaler})

    @classmethod
    def load(cls, path: str) -> "EMRMerged":
        tensors, header = bitpack.load_file(path, FORMAT)
        keys = header["keys"]
        return cls(header["tasks"], {k: tensors[f"tau_uni/{k}"] for k in keys},
                   {k: tensors[f"mask/{k}"] for k in keys}, tensors["rescalers"],
                   header["rescaler"])

    def storage_report(self) -> dict:
        dense = sum(v.numel() * v.element_size() for v in self.tau_uni.values())
        per_task = sum(m[0].numel() for m in self.masks.values()) + self.rescalers.element_size()
        return {"num_tasks": len(self.tasks), "shared_bytes": dense,
                "per_task_bytes": per_task, "dense_per_task_bytes": dense,
                "per_task_fraction": per_task / dense if dense else 0.0}


def emr_merging(pretrained: StateDict, finetuned: Experts, rescaler: str = "code",
                validate_inputs: bool = True, qkv: str = "fused") -> EMRMerged:
    """τ_uni, the T bit-packed masks and the T rescalers, key by key (two reads of each expert);
    `qkv`: which tensors the "code" rescaler's per-tensor means are taken over."""
    if rescaler not in RESCALERS:
        raise ValueError(f"rescaler={rescaler!r}: expected one of {RESCALERS}")
    if validate_inputs:
        validate(pretrained, finetuned)
    num_tasks = len(finetuned)
    tau_uni, masks = {}, {}
    before = torch.zeros(num_tasks, dtype=torch.float64)   # Σ_n |τ_t,n| (mean or sum per key)
    after = torch.zeros(num_tasks, dtype=torch.float64)    # Σ_n |M_t,n ⊙ τ_uni,n|
    for key in merged_keys(pretrained):
        numel = numel_of(pretrained, key)
        uni = torch.empty(numel, dtype=torch.float32)
        packed = torch.empty(num_tasks, (numel + 7) // 8, dtype=torch.uint8)
        key_before = torch.zeros(num_tasks, dtype=torch.float64)
        key_after = torch.zeros(num_tasks, dtype=torch.float64)
        for start, stop in chunks(numel):  # elementwise: chunks keep temporaries small
            span, bytes_ = (start, stop), slice(start // 8, (stop + 7) // 8)
            theta0 = as_float(read_flat(pretrained, key, span))
            total = None
            for t, tau in enumerate(taus_at(theta0, finetuned, key, span)):
                key_before[t] += float(tau.abs().sum(dtype=torch.float64))
                total = tau if total is None else total.add_(tau)
            sign = torch.where(total > 0, 1.0, -1.0).to(theta0.dtype)  # mean > 0 ⇔ sum > 0
            del total
            magnitude = torch.zeros_like(theta0)
            for t, tau in enumerate(taus_at(theta0, finetuned, key, span)):
                agreement = tau.mul_(sign)                      # τ_t·s, in place: τ_t is ours
                packed[t, bytes_] = bitpack.pack(agreement > 0)  # M_t
                # |M_t ⊙ τ_t| = τ_t·s where M_t, else 0: the running max from 0 needs no |·|
                torch.maximum(magnitude, agreement, out=magnitude)
            for t in range(num_tasks):  # |M_t ⊙ τ_uni| = M_t ⊙ u
                mask = bitpack.unpack(packed[t, bytes_], (stop - start,))
                key_after[t] += float(torch.where(mask, magnitude, 0.0).sum(dtype=torch.float64))
            uni[start:stop] = magnitude.mul_(sign)
        if rescaler == "code":  # the code's per-tensor means (q, k, v: three equal-sized tensors)
            size = max(numel // qkv_parts(key, qkv), 1)
            key_before, key_after = key_before / size, key_after / size
        before += key_before
        after += key_after
        tau_uni[key] = uni.view(shape_of(pretrained, key))
        masks[key] = packed
    # A task whose τ is 0 everywhere has nothing to rescale (0/0); its model is θ0 for any λ_t.
    rescalers = torch.where(after > 0, before / after.clamp(min=1e-300), torch.ones_like(before))
    return EMRMerged(list(finetuned), tau_uni, masks, rescalers.to(torch.float32), rescaler)
