"""TSV-Compress (METHODS.md §2.12): each task keeps its own low-rank task vector.

Per task and 2-D key (here *including* text_projection), keep the k = r // T leading singular
triplets of Δ_t (the same k as TSV-M); other keys are stored in full. Task t's model is rebuilt on
demand as θ̂_t = θ0 + U_k diag(S_k) V_kᵀ (α = 1, task identity required). A delta that is exactly
zero (text-side leftovers) is stored at rank 0, which rebuilds it exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from taskmerge.merging import bitpack
from taskmerge.merging.task_vectors import Experts, StateDict, apply, as_float, merged_keys, taus_at, validate
from taskmerge.merging.tsv import leading_triplets

FORMAT = "taskmerge.tsvc/1"


@dataclass
class TSVCompressed:
    """TSV-C: per task, (U_k, S_k, V_kᵀ) of every 2-D key and the dense τ_t of the other keys."""
    tasks: list[str]
    factors: list[dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]
    dense: list[dict[str, torch.Tensor]]

    def task_delta(self, task: int | str) -> dict[str, torch.Tensor]:
        t = self.tasks.index(task) if isinstance(task, str) else task
        delta = {key: torch.linalg.multi_dot((u, torch.diag(s), vh)) if s.numel()
                 else u.new_zeros(u.shape[0], vh.shape[1])
                 for key, (u, s, vh) in self.factors[t].items()}
        return {**delta, **self.dense[t]}

    def task_state_dict(self, pretrained: StateDict, task: int | str) -> dict[str, torch.Tensor]:
        return apply(pretrained, self.task_delta(task), 1.0)

    def save(self, path: str) -> None:
        tensors = {}
        for t in range(len(self.tasks)):
            for key, (u, s, vh) in self.factors[t].items():
                tensors.update({f"{t}/U/{key}": u, f"{t}/S/{key}": s, f"{t}/Vh/{key}": vh})
            tensors.update({f"{t}/dense/{key}": v for key, v in self.dense[t].items()})
        bitpack.save_file(tensors, path, {"format": FORMAT, "tasks": self.tasks,
                                          "factor_keys": list(self.factors[0]),
                                          "dense_keys": list(self.dense[0])})

    @classmethod
    def load(cls, path: str) -> "TSVCompressed":
        tensors, header = bitpack.load_file(path, FORMAT)
        ts = range(len(header["tasks"]))
        factors = [{k: (tensors[f"{t}/U/{k}"], tensors[f"{t}/S/{k}"], tensors[f"{t}/Vh/{k}"])
                    for k in header["factor_keys"]} for t in ts]
        dense = [{k: tensors[f"{t}/dense/{k}"] for k in header["dense_keys"]} for t in ts]
        return cls(header["tasks"], factors, dense)

    def storage_report(self) -> dict:
        def nbytes(ts):
            return sum(x.numel() * x.element_size() for x in ts)
        per_task = [nbytes(x for f in self.factors[t].values() for x in f)
                    + nbytes(self.dense[t].values()) for t in range(len(self.tasks))]
        dense = nbytes(self.dense[0].values()) + sum(
            u.shape[0] * vh.shape[1] * u.element_size() for u, _, vh in self.factors[0].values())
        return {"num_tasks": len(self.tasks), "shared_bytes": 0, "per_task_bytes": per_task,
                "dense_per_task_bytes": dense,
                "per_task_fraction": sum(per_task) / len(per_task) / dense if dense else 0.0}


def tsv_compress(pretrained: StateDict, finetuned: Experts, rank: int | None = None,
                 validate_inputs: bool = True, device: str | torch.device | None = None) -> TSVCompressed:
    """Each task's top k = r // T singular triplets per 2-D key (text_projection included);
    `rank` replaces r // T by min(rank, r) (a large rank reconstructs every expert). `device`:
    where the SVDs run (the factors come back to the CPU)."""
    on_device = device is not None
    if validate_inputs:
        validate(pretrained, finetuned)
    num_tasks = len(finetuned)
    factors = [{} for _ in range(num_tasks)]
    dense = [{} for _ in range(num_tasks)]
    for key in merged_keys(pretrained):
        theta0 = as_float(pretrained[key])
        for t, tau in enumerate(taus_at(theta0, finetuned, key)):
            if tau.ndim != 2:
                dense[t][key] = tau
                continue
            r = min(tau.shape)
            k = r // num_tasks if rank is None else min(rank, r)
            if not tau.any():  # zero delta: rank 0 rebuilds it exactly
                k = 0
            src = tau.to(device) if on_device else tau
            factors[t][key] = tuple(x.contiguous().cpu() for x in leading_triplets(src, k)) if k else (
                tau.new_zeros(tau.shape[0], 0), tau.new_zeros(0), tau.new_zeros(0, tau.shape[1]))
    return TSVCompressed(list(finetuned), factors, dense)
