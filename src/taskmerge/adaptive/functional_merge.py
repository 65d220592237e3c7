"""The merged encoder θ(λ) = θ0 + Σ_t λ_t τ_t as a differentiable function of λ (METHODS.md §1.5, A.1).

Task-wise: one row of T coefficients for every tensor. Layer-wise: one row per state-dict tensor
(P rows, in state-dict order: 158 for ViT-B/32, incl. the six text-side leftovers, §2.6).
λ = clamp(λ_raw, 0, 1); the pre-trained coefficient is fixed at 1.

The originals rebuild the merge on the CPU on every forward and keep requires_grad on nine copies of
the model. Here the source vectors are stacked per tensor once, (T, *shape), as buffers that never
get gradients; `merge()` runs once per optimisation step and every batch of that step goes through
`torch.func.functional_call` with the merged weights. θ0 is the encoder's own weights.
"""
from __future__ import annotations

import copy
from typing import Callable, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from taskmerge.models.encoders import ImageEncoder, load_encoder_state

MODES = ("task", "layer")


class MergedEncoder(nn.Module):
    def __init__(self, encoder: ImageEncoder, pretrained: Mapping[str, torch.Tensor],
                 source_vectors: Sequence[Mapping[str, torch.Tensor] | Callable[[], Mapping[str, torch.Tensor]]],
                 mode: str = "layer", init: float = 0.3, clamp: bool = True,
                 device: str | torch.device = "cpu"):
        """`source_vectors`: one per task, in task order; a zero-argument callable is called when its
        turn comes, so only one task's vector need be in memory beside the stacks. The stacks are
        allocated on `device` and filled task by task, so the T vectors never exist on the host and
        the device at once (ViT-L/14 × 20 tasks: 24 GB)."""
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if len(source_vectors) == 0:
            raise ValueError("no source vectors: pass one task vector (or TIES-selected vector) per task")
        load_encoder_state(encoder, pretrained, source="pretrained state dict")
        self.encoder = encoder.to(device).requires_grad_(False).eval()
        self.mode, self.clamp, self.num_tasks = mode, clamp, len(source_vectors)
        self.param_names = list(encoder.state_dict().keys())
        # encode_image only touches the vision tower: the text leftovers are merged for saving only.
        self.forward_names = [n for n in self.param_names if n.startswith("model.visual.")]
        theta0 = encoder.state_dict()
        stacks = [torch.empty((self.num_tasks, *theta0[k].shape), dtype=theta0[k].dtype, device=device)
                  for k in self.param_names]
        for t, source in enumerate(source_vectors):
            tau = source() if callable(source) else source
            missing = [k for k in self.param_names if k not in tau]
            if missing:
                raise ValueError(f"source vector {t} lacks {len(missing)} encoder keys, e.g. {missing[0]!r}")
            for k, stack in zip(self.param_names, stacks):
                if tuple(tau[k].shape) != tuple(theta0[k].shape):
                    raise ValueError(f"source vector {t}, key {k!r}: shape {tuple(tau[k].shape)}, "
                                     f"encoder has {tuple(theta0[k].shape)}")
                stack[t] = tau[k]
            del tau
        for j, stack in enumerate(stacks):
            self.register_buffer(f"tau_{j}", stack, persistent=False)
        rows = 1 if mode == "task" else len(self.param_names)
        self.lam_raw = nn.Parameter(torch.full((rows, self.num_tasks), float(init), device=device))
        self._row = {k: (0 if mode == "task" else j) for j, k in enumerate(self.param_names)}
        self._col = {k: j for j, k in enumerate(self.param_names)}

    def lam(self) -> torch.Tensor:
        """The effective coefficients, rows × T (hard clamp: zero gradient outside [0, 1])."""
        return self.lam_raw.clamp(0.0, 1.0) if self.clamp else self.lam_raw

    def merge(self, names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """θ_j = θ0_j + Σ_t λ[row(j), t] τ_t,j for each tensor j; differentiable in λ only."""
        lam = self.lam()
        theta0 = self.encoder.state_dict(keep_vars=True)
        out = {}
        for k in (self.param_names if names is None else names):
            tau = getattr(self, f"tau_{self._col[k]}")
            out[k] = theta0[k].detach() + torch.tensordot(lam[self._row[k]], tau, dims=1)
        return out

    def forward_with(self, weights: Mapping[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        """The encoder's feature with `weights` in place of its own (unlisted tensors: θ0)."""
        return functional_call(self.encoder, dict(weights), (images,))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.forward_with(self.merge(self.forward_names), images)

    @torch.no_grad()
    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """Every state-dict tensor of the merged model (text leftovers included), detached."""
        return {k: v.detach().clone() for k, v in self.merge().items()}

    def to_image_encoder(self) -> ImageEncoder:
        """A plain frozen ImageEncoder with the merged weights (a base for Surgery / SurgeryV2)."""
        encoder = copy.deepcopy(self.encoder)
        encoder.load_state_dict(self.merged_state_dict())
        return encoder.requires_grad_(False).eval()

    def coefficient_rows(self) -> torch.Tensor:
        """The published layout: rows × (1 + T), column 0 = 1.0 (pre-trained), then clamp(λ)."""
        lam = self.lam().detach().cpu()
        return torch.cat([torch.ones(lam.shape[0], 1, dtype=lam.dtype), lam], dim=1)

    @torch.no_grad()
    def set_lambda(self, lam: torch.Tensor, source: str = "coefficients") -> None:
        lam = torch.as_tensor(lam, dtype=self.lam_raw.dtype)
        if tuple(lam.shape) != tuple(self.lam_raw.shape):
            raise ValueError(f"{source}: shape {tuple(lam.shape)}, this {self.mode}-wise merge of "
                             f"{self.num_tasks} tasks over {len(self.param_names)} tensors needs "
                             f"{tuple(self.lam_raw.shape)}")
        self.lam_raw.copy_(lam)

    def load_table(self, table, tasks: Sequence[str]) -> None:
        """Set λ from an `adamerging_coefficients.CoefficientTable` (published or learned), with its
        columns picked by task name and its rows checked against this encoder's tensor names."""
        if table.mode != self.mode:
            raise ValueError(f"{table.source}: a {table.mode}-wise table cannot set a {self.mode}-wise "
                             f"merge; build MergedEncoder(..., mode={table.mode!r})")
        table.check_param_names(self.param_names)
        self.set_lambda(table.lam_for(tasks), source=table.source)
