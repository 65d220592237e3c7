"""Layer 3, merging: task vectors and the data-free merge math, one file per method (METHODS.md
§2.1–2.3, §2.10–2.14; the 2025 records Iso-C/CTS, WUDI, CART, DARE, PCB: METHODS_RECORDS.md). May
import storage.

Every function takes θ0 as a state dict and the experts as `{task: state dict}` (dicts or lazy
readers, see task_vectors.py), validates them before any work, and reads one key at a time.
Single-model methods return the merged θ (a dict of tensors in θ0's dtype); the per-task methods
return a compact object with `.task_state_dict(θ0, task)`, `.save(path)`, `.load(path)` and
`.storage_report()`.
"""
from taskmerge.merging.cart import PRESETS as CART_PRESETS
from taskmerge.merging.cart import cart_delta, cart_merging
from taskmerge.merging.dare import PRESETS as DARE_PRESETS
from taskmerge.merging.dare import dare_task_arithmetic, dare_ties, drop_and_rescale
from taskmerge.merging.emr import EMRMerged, emr_merging
from taskmerge.merging.iso import ALPHA_GRID as ISO_ALPHA_GRID
from taskmerge.merging.iso import iso_delta, iso_merging
from taskmerge.merging.pcb import PCBScores, pcb_combine, pcb_delta, pcb_merging, pcb_scores
from taskmerge.merging.tall_masks import LAMS as TALL_LAMS
from taskmerge.merging.tall_masks import (TallMasks, consensus_mask, consensus_merging, multitask_vector,
                                          tall_mask, tall_masks)
from taskmerge.merging.task_arithmetic import DEFAULT_LAM, LAM_GRID_TALL, LAM_GRID_TSV, task_arithmetic
from taskmerge.merging.ties import PRESETS as TIES_PRESETS
from taskmerge.merging.ties import ties_delta, ties_merging, ties_selected
from taskmerge.merging.tsv import ALPHA_GRID as TSV_ALPHA_GRID
from taskmerge.merging.tsv import tsv_delta, tsv_merging
from taskmerge.merging.tsv_compress import TSVCompressed, tsv_compress
from taskmerge.merging.weight_averaging import weight_averaging
from taskmerge.merging.wudi import PRESETS as WUDI_PRESETS
from taskmerge.merging.wudi import wudi_delta, wudi_merging

__all__ = ["weight_averaging", "task_arithmetic", "DEFAULT_LAM", "LAM_GRID_TALL", "LAM_GRID_TSV",
           "ties_merging", "ties_delta", "ties_selected", "TIES_PRESETS",
           "emr_merging", "EMRMerged", "tsv_merging", "tsv_delta", "TSV_ALPHA_GRID",
           "tsv_compress", "TSVCompressed", "multitask_vector", "tall_mask", "tall_masks",
           "TallMasks", "TALL_LAMS", "consensus_mask", "consensus_merging",
           "iso_merging", "iso_delta", "ISO_ALPHA_GRID", "wudi_merging", "wudi_delta", "WUDI_PRESETS",
           "cart_merging", "cart_delta", "CART_PRESETS", "drop_and_rescale", "dare_task_arithmetic",
           "dare_ties", "DARE_PRESETS", "pcb_merging", "pcb_delta", "pcb_scores", "pcb_combine",
           "PCBScores"]
