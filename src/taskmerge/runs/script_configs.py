"""The typed config of every entry script, and the names its settings may take.

One dataclass per script kind, built from the script's top-level variables by `settings.from_values`
(see runs/cli.py). The fields have no defaults: the scripts' variables are the one source of every
default, a script that misses a field or carries an unknown one is refused with its name, and
tests/test_script_configs.py builds each script's variables into its config. Each field declares its
type (the annotation) and its range or choices (`setting(...)`); `check_together` holds the rules
between fields. The data-free methods' own settings (`*Merge`) are separate classes, because a
Surgery script builds its base's settings from its own fields (`base_merge_settings`).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import ClassVar

from taskmerge import merging
from taskmerge.adaptive.surgery import ZERO_GRAD_MODES
from taskmerge.compute import cpu_paths
from taskmerge.merging.emr import RESCALERS
from taskmerge.merging.iso import METHODS as ISO_METHODS
from taskmerge.merging.task_arithmetic import LAM_GRID_TALL, LAM_GRID_TSV
from taskmerge.merging.ties import MERGES
from taskmerge.merging.task_vectors import QKV_MODES
from taskmerge.merging.tsv import METHODS as TSV_METHODS
from taskmerge.merging.wudi import SOLVERS as WUDI_SOLVERS
from taskmerge.runs.settings import setting, subset
from taskmerge.runs.setup import DATA_FORMATS, resolve_tasks
from taskmerge.storage.errors import ConfigError

# The coefficient grids a `val_grid` setting names (choosing λ / α on the <Task>Val splits).
VAL_GRIDS = {"tall_masks": LAM_GRID_TALL, "tsv": LAM_GRID_TSV, "tsv_alpha": merging.TSV_ALPHA_GRID}
# AdaMerging method_name → (coefficient granularity, TIES-selected source vectors?)
ADAMERGING = {"tw_adamerging": ("task", False), "lw_adamerging": ("layer", False),
              "tw_adamergingpp": ("task", True), "lw_adamergingpp": ("layer", True)}
# The EnnengYang base names of the Surgery scripts → our merger and the settings that define the
# name (they fill only what the Surgery script leaves None: e.g. task_arithmetic's λ is 0.3 unless
# `scaling_coef` is set, a consensus base's val_grid is tall_masks', a tsv_merging base is TSV-M).
BASES = {"weight_averaging": ("weight_averaging", {}),
         "task_arithmetic": ("task_arithmetic",
                             {"scaling_coef": merging.DEFAULT_LAM, "val_grid": "tall_masks"}),
         "ties_merging": ("ties_merging", {"val_grid": "tall_masks"}),
         "emr_merging": ("emr_merging", {}),
         "tsv_merging": ("tsv_merging", {"method": "TSVM", "val_grid": "tsv_alpha"}),
         "consensus": ("tall_masks", {"method": "consensus", "val_grid": "tall_masks", "load_mask": False}),
         "iso_c": ("iso_merging", {"method": "iso_c"}),
         "iso_cts": ("iso_merging", {"method": "iso_cts"}),
         "wudi_merging": ("wudi_merging", {}),
         "cart_merging": ("cart_merging", {}),
         "pcb_merging": ("pcb_merging", {})}
COEFFICIENT_SOURCES = ("learn", "published", "auto")   # or a saved .json
# How a per-tensor method sees attention's q/k/v: "auto" is "separate" on the fusionbench family
# (FusionBench's CLIPVisionModel has q_proj, k_proj, v_proj) and "fused" (open_clip's in_proj, the
# originals') elsewhere, except WUDI's fusionbench preset, which is FusionBench's merge everywhere.
QKV_SETTINGS = ("auto",) + QKV_MODES


@dataclass
class RunConfig:
    """What every evaluating script sets: the model, its checkpoints and data, the log."""
    model_name: str = setting(nonempty=True)
    checkpoint_dir: str = setting(nonempty=True)
    data_location: str = setting(nonempty=True)
    data_format: str = setting(choices=DATA_FORMATS)    # the real tasks' format; embedded ignores it
    trust_label_order: bool = setting()         # data whose class names match none of ours: accepted
    tasks: list[str] | str = setting(unique=True)       # []: the model's benchmark; or "TALL14"/"TALL20"/…
    log_dir: str = setting(nonempty=True)
    cache_dir: str = setting(nonempty=True)    # "auto": the model folder, or the user's cache if read-only
    batch_size: int = setting(ge=1)
    device: str = setting(nonempty=True)       # "auto" | "cpu" | "cuda" | "cuda:<i>" (checked when resolved)
    tf32: bool = setting()                     # TF32 matmuls on CUDA (compute/devices.py)
    num_workers: int = setting(ge=0, words=("auto",))   # DataLoader workers; "auto": 0 on CPU
    threads: int = setting(ge=1, words=("auto",))       # torch's CPU threads; "auto": compute/devices.py
    cpu_paths: str = setting(choices=cpu_paths.SETTINGS)  # "auto": pinned for the embedded model on CPU
    rendezvous_timeout: float = setting(gt=0)           # torchrun: seconds a rank waits for the others

    def check_together(self):
        resolve_tasks(self.tasks)  # a name must be one of the benchmarks
        method_rules = getattr(super(), "check_together", None)  # the method's *Merge, next in the MRO
        if method_rules is not None:
            method_rules()


@dataclass
class SingleTaskEvalConfig(RunConfig):
    split: str = setting(choices=("test", "val"))


@dataclass
class MergeRunConfig(RunConfig):
    save_dir: str = setting()                  # "" skips saving


# --- the data-free methods' own settings (runs/data_free.py MERGERS take these) ---
@dataclass
class WeightAveragingMerge:
    drop_last: bool = setting()


@dataclass
class DareSettings:
    """DARE before TA or TIES: drop each task-vector entry with probability p, rescale by 1/(1 − p)."""
    dare_p: float = setting(ge=0.0, lt=1.0)    # 0: no DARE
    dare_rescale: bool = setting()
    dare_seed: int = setting(ge=0)


@dataclass
class TaskArithmeticMerge(DareSettings):
    scaling_coef: float = setting(finite=True)
    select_on_val: bool = setting()
    val_grid: str = setting(choices=VAL_GRIDS)


@dataclass
class TiesMerge(DareSettings):
    preset: str = setting(choices=merging.TIES_PRESETS)
    k: float | None = setting(gt=0.0, le=1.0)
    merge: str | None = setting(choices=MERGES)
    scaling_coef: float | None = setting(finite=True)
    val_grid: str = setting(choices=VAL_GRIDS)


@dataclass
class EMRMerge:
    rescaler: str = setting(choices=RESCALERS)
    qkv: str = setting(choices=QKV_SETTINGS)   # the "code" rescaler's per-tensor means


@dataclass
class TSVMerge:
    method: str = setting(choices=TSV_METHODS + ("TSVC",))
    alpha: float = setting(finite=True)
    select_on_val: bool = setting()
    val_grid: str = setting(choices=VAL_GRIDS)
    merge_device: str = setting(nonempty=True)   # where the SVDs run: "cpu" | "auto" | "cuda[:i]"
    qkv: str = setting(choices=QKV_SETTINGS)

    def check_together(self):
        if self.method == "TSVC" and self.qkv == "separate":
            raise ConfigError("setting qkv='separate' is not allowed with method='TSVC': FusionBench has "
                              "no TSV-C (its TaskSingularVectorCompression raises NotImplementedError), "
                              "so TSV-C keeps the original's fused in_proj (set qkv='auto' or 'fused')")


@dataclass
class TallMasksMerge:
    method: str = setting(choices=("tall_mask", "consensus"))
    use_ties: bool = setting()
    tall_lambdas: list[float] = setting(ge=0.0, finite=True, nonempty=True, unique=True)
    prun_thre_k: int = setting(ge=1)
    alpha: float = setting(finite=True)
    select_on_val: bool = setting()
    val_grid: str = setting(choices=VAL_GRIDS)
    load_mask: bool = setting()                 # read the released TALL_mask_<N>task.npy


@dataclass
class IsoMerge:
    method: str = setting(choices=ISO_METHODS)
    common_space_fraction: float = setting(ge=0.0, le=1.0)
    alpha: float = setting(finite=True)
    select_on_val: bool = setting()
    merge_device: str = setting(nonempty=True)   # where the SVDs run: "cpu" | "auto" | "cuda[:i]"
    qkv: str = setting(choices=QKV_SETTINGS)


@dataclass
class WUDIMerge:
    wudi_preset: str = setting(choices=merging.WUDI_PRESETS)
    wudi_solver: str = setting(choices=WUDI_SOLVERS)
    wudi_steps: int | None = setting(ge=0)
    wudi_lr: float = setting(gt=0.0, finite=True)
    wudi_ridge: float = setting(ge=0.0, finite=True)
    qkv: str = setting(choices=QKV_SETTINGS)

    def check_together(self):
        if self.wudi_ridge > 0 and self.wudi_solver != "closed_form":
            raise ConfigError(f"setting wudi_ridge={self.wudi_ridge} is not allowed with wudi_solver="
                              f"{self.wudi_solver!r}: the ridge regularises the closed form only "
                              f"(set wudi_ridge=0.0, or wudi_solver='closed_form')")


@dataclass
class CARTMerge:
    cart_preset: int | None = setting(choices=tuple(merging.CART_PRESETS))
    cart_lambda: float | None = setting(finite=True)
    cart_rank_ratio: float | None = setting(ge=0.0, le=1.0)


@dataclass
class PCBMerge:
    pcb_ratio: float = setting(gt=0.0, le=1.0)
    pcb_lambda: float = setting(finite=True)     # λ_t of every task when not searched (pcb.py)
    # pcb_ES.py's search of one λ_t per task on <Task>Val (runs/selection.py search_coefficients)
    pcb_search: bool = setting()
    pcb_search_lower: float = setting(finite=True)
    pcb_search_upper: float = setting(finite=True)
    pcb_search_init: float = setting(finite=True)
    pcb_search_budget: int = setting(ge=1)
    pcb_search_seed: int = setting(ge=0)

    def check_together(self):
        if not self.pcb_search_lower < self.pcb_search_upper:
            raise ConfigError(f"settings pcb_search_lower={self.pcb_search_lower} and pcb_search_upper="
                              f"{self.pcb_search_upper} are not a range: lower must be below upper "
                              f"(pcb_ES.py: 0.8 and 1.3)")
        if not self.pcb_search_lower <= self.pcb_search_init <= self.pcb_search_upper:
            raise ConfigError(f"setting pcb_search_init={self.pcb_search_init} is outside "
                              f"[{self.pcb_search_lower}, {self.pcb_search_upper}]: the search starts "
                              f"inside its bounds (pcb_ES.py: 1.0 in [0.8, 1.3])")


# --- the data-free scripts: where they run, plus their method's settings ---
@dataclass
class WeightAveragingConfig(MergeRunConfig, WeightAveragingMerge):
    method_key: ClassVar[str] = "weight_averaging"


@dataclass
class TaskArithmeticConfig(MergeRunConfig, TaskArithmeticMerge):
    method_key: ClassVar[str] = "task_arithmetic"


@dataclass
class TiesMergingConfig(MergeRunConfig, TiesMerge):
    method_key: ClassVar[str] = "ties_merging"


@dataclass
class EMRMergingConfig(MergeRunConfig, EMRMerge):
    method_key: ClassVar[str] = "emr_merging"


@dataclass
class TSVMergingConfig(MergeRunConfig, TSVMerge):
    method_key: ClassVar[str] = "tsv_merging"


@dataclass
class TallMasksConfig(MergeRunConfig, TallMasksMerge):
    method_key: ClassVar[str] = "tall_masks"


@dataclass
class IsoMergingConfig(MergeRunConfig, IsoMerge):
    method_key: ClassVar[str] = "iso_merging"


@dataclass
class WUDIMergingConfig(MergeRunConfig, WUDIMerge):
    method_key: ClassVar[str] = "wudi_merging"


@dataclass
class CARTMergingConfig(MergeRunConfig, CARTMerge):
    method_key: ClassVar[str] = "cart_merging"


@dataclass
class PCBMergingConfig(MergeRunConfig, PCBMerge):
    method_key: ClassVar[str] = "pcb_merging"


MERGE_SETTINGS = {"weight_averaging": WeightAveragingMerge, "task_arithmetic": TaskArithmeticMerge,
                  "ties_merging": TiesMerge, "emr_merging": EMRMerge, "tsv_merging": TSVMerge,
                  "tall_masks": TallMasksMerge, "iso_merging": IsoMerge, "wudi_merging": WUDIMerge,
                  "cart_merging": CARTMerge, "pcb_merging": PCBMerge}


# --- the data-dependent scripts ---
@dataclass
class AdaMergingRunConfig(MergeRunConfig):
    resume_dir: str = setting()                # "" disables resuming
    seed: int = setting(ge=0)
    method_name: str = setting(choices=ADAMERGING)
    coefficients: str = setting(choices=COEFFICIENT_SOURCES, suffix=".json")
    prior: float = setting(ge=0.0, le=1.0)     # the initial λ
    clamp: bool = setting()                    # λ kept in [0, 1] (the originals); False: FusionBench's
    adamerging_steps: int = setting(ge=1)
    adamerging_lr: float = setting(gt=0.0, finite=True)
    adamerging_eval_every: int = setting(ge=1)
    checkpoint_every: int = setting(ge=1)

    def check_together(self):
        super().check_together()
        if self.coefficients not in COEFFICIENT_SOURCES and not os.path.isfile(self.coefficients):
            raise ConfigError(f"setting coefficients={self.coefficients!r}: no such file; give a saved "
                              f"coefficients .json, or one of {', '.join(map(repr, COEFFICIENT_SOURCES))}")


@dataclass
class SurgeryRunConfig(AdaMergingRunConfig):
    method_name: str = setting(choices=tuple(BASES) + tuple(ADAMERGING))
    # the base merge's settings; each base reads only its own (None: what the base name defines)
    drop_last: bool = setting()
    scaling_coef: float | None = setting(finite=True)
    preset: str = setting(choices=merging.TIES_PRESETS)
    k: float | None = setting(gt=0.0, le=1.0)
    merge: str | None = setting(choices=MERGES)
    rescaler: str = setting(choices=RESCALERS)
    alpha: float = setting(finite=True)
    select_on_val: bool = setting()
    val_grid: str | None = setting(choices=VAL_GRIDS)
    use_ties: bool = setting()
    tall_lambdas: list[float] = setting(ge=0.0, finite=True, nonempty=True, unique=True)
    prun_thre_k: int = setting(ge=1)
    merge_device: str = setting(nonempty=True)
    dare_p: float = setting(ge=0.0, lt=1.0)
    dare_rescale: bool = setting()
    dare_seed: int = setting(ge=0)
    common_space_fraction: float = setting(ge=0.0, le=1.0)
    wudi_preset: str = setting(choices=merging.WUDI_PRESETS)
    wudi_solver: str = setting(choices=WUDI_SOLVERS)
    wudi_steps: int | None = setting(ge=0)
    wudi_lr: float = setting(gt=0.0, finite=True)
    wudi_ridge: float = setting(ge=0.0, finite=True)
    cart_preset: int | None = setting(choices=tuple(merging.CART_PRESETS))
    cart_lambda: float | None = setting(finite=True)
    cart_rank_ratio: float | None = setting(ge=0.0, le=1.0)
    pcb_ratio: float = setting(gt=0.0, le=1.0)
    pcb_lambda: float = setting(finite=True)
    pcb_search: bool = setting()
    pcb_search_lower: float = setting(finite=True)
    pcb_search_upper: float = setting(finite=True)
    pcb_search_init: float = setting(finite=True)
    pcb_search_budget: int = setting(ge=1)
    pcb_search_seed: int = setting(ge=0)
    qkv: str = setting(choices=QKV_SETTINGS)       # emr / tsv / iso / wudi bases
    # the surgery itself
    surgery: str = setting(choices=("v1", "v2"))
    rank: int = setting(ge=1, words=("auto",))   # "auto": the SurgeryV2 original's per model
    iterations: int = setting(ge=1)
    eval_iterations: int = setting(ge=1)
    lr: float = setting(gt=0.0, finite=True)
    zero_grad_mode: str = setting(choices=ZERO_GRAD_MODES)
    online: bool = setting()
    feature_cache: str = setting()             # "" : <cache folder>/feature_cache

    def check_together(self):
        super().check_together()
        if self.online and self.surgery == "v2":
            raise ConfigError("setting online=True is not allowed with surgery='v2': the online "
                              "protocol exists for Surgery v1 only (set online=False, or surgery='v1')")
        if self.method_name in BASES:
            base_merge_settings(self)  # a bad setting of the base is refused now, not after the setup


def base_merge_settings(config: SurgeryRunConfig):
    """(merger name, its checked settings) of a Surgery run's data-free base."""
    name, fixed = BASES[config.method_name]
    return name, subset(MERGE_SETTINGS[name], config, f"the {config.method_name} base's settings", fixed)


# --- the two scripts that prepare checkpoints ---
@dataclass
class BuildBenchmarkConfig:
    checkpoint_dir: str = setting(nonempty=True)
    data_location: str = setting(nonempty=True)
    micro: bool = setting()
    progress: bool = setting()


@dataclass
class ConvertCheckpointsConfig:
    checkpoint_dir: str = setting(nonempty=True)
    model_name: str = setting(nonempty=True)
    tasks: list[str] | str = setting(nonempty=True, unique=True)   # or a benchmark name ("TALL20")
    family: str = setting(choices=("task_vectors", "tall_masks", "auto"))
    out_dir: str | None = setting(nonempty=True)

    def check_together(self):
        resolve_tasks(self.tasks)


# --- the script that reads the reports back ---
@dataclass
class SummaryConfig:
    log_dir: str = setting(nonempty=True)
    model: str = setting()
    family: str = setting()
    method: str = setting()
    csv_path: str = setting()
