"""The merge methods, one declaration each (runs/registry.py): importing this package declares them
all. The built-in ones come first, in the order of the results tables' rows (with task identity
after those without); every other module of this folder is a
method of your own and is imported after them (docs/ADDING_A_METHOD.md): adding a method edits no
file here.
"""
import importlib
import pkgutil

# importing a module declares its method; the order is the tables' row order (Traditional MTL
# first: a reference row, beside Individual)
from taskmerge.runs.methods import traditional_mtl  # noqa: F401
from taskmerge.runs.methods import weight_averaging  # noqa: F401
from taskmerge.runs.methods import fisher_merging  # noqa: F401
from taskmerge.runs.methods import regmean  # noqa: F401
from taskmerge.runs.methods import task_arithmetic  # noqa: F401
from taskmerge.runs.methods import ties_merging  # noqa: F401
from taskmerge.runs.methods import emr_merging  # noqa: F401
from taskmerge.runs.methods import tsv_merging  # noqa: F401
from taskmerge.runs.methods import tall_masks  # noqa: F401
from taskmerge.runs.methods import adamerging  # noqa: F401
from taskmerge.runs.methods import iso_merging  # noqa: F401
from taskmerge.runs.methods import wudi_merging  # noqa: F401
from taskmerge.runs.methods import cart_merging  # noqa: F401
from taskmerge.runs.methods import pcb_merging  # noqa: F401
BUILT_IN = ("traditional_mtl", "weight_averaging", "fisher_merging", "regmean", "task_arithmetic",
            "ties_merging", "emr_merging", "tsv_merging", "tall_masks", "adamerging", "iso_merging",
            "wudi_merging", "cart_merging", "pcb_merging")
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    if _module not in BUILT_IN and not _module.startswith("_"):
        importlib.import_module(f"{__name__}.{_module}")

from taskmerge.runs.methods.adamerging import AdaMergingSurgeryConfig
from taskmerge.runs.methods.cart_merging import CARTMergingConfig, CARTMergingSurgeryConfig
from taskmerge.runs.methods.emr_merging import EMRMergingConfig, EMRMergingSurgeryConfig
from taskmerge.runs.methods.fisher_merging import FisherMergingConfig, FisherMergingSurgeryConfig
from taskmerge.runs.methods.iso_merging import IsoMergingConfig, IsoMergingSurgeryConfig
from taskmerge.runs.methods.pcb_merging import PCBMergingConfig, PCBMergingSurgeryConfig
from taskmerge.runs.methods.regmean import RegMeanConfig, RegMeanSurgeryConfig
from taskmerge.runs.methods.tall_masks import TallMasksConfig, TallMasksSurgeryConfig
from taskmerge.runs.methods.task_arithmetic import TaskArithmeticConfig, TaskArithmeticSurgeryConfig
from taskmerge.runs.methods.ties_merging import TiesMergingConfig, TiesMergingSurgeryConfig
from taskmerge.runs.methods.traditional_mtl import TraditionalMTLConfig, TraditionalMTLSurgeryConfig
from taskmerge.runs.methods.tsv_merging import TSVMergingConfig, TSVMergingSurgeryConfig
from taskmerge.runs.methods.weight_averaging import WeightAveragingConfig, WeightAveragingSurgeryConfig
from taskmerge.runs.methods.wudi_merging import WUDIMergingConfig, WUDIMergingSurgeryConfig

__all__ = ["AdaMergingSurgeryConfig", "CARTMergingConfig", "CARTMergingSurgeryConfig", "EMRMergingConfig",
           "EMRMergingSurgeryConfig", "FisherMergingConfig", "FisherMergingSurgeryConfig", "IsoMergingConfig",
           "IsoMergingSurgeryConfig", "PCBMergingConfig", "PCBMergingSurgeryConfig", "RegMeanConfig",
           "RegMeanSurgeryConfig", "TallMasksConfig", "TallMasksSurgeryConfig", "TaskArithmeticConfig",
           "TaskArithmeticSurgeryConfig", "TiesMergingConfig", "TiesMergingSurgeryConfig",
           "TraditionalMTLConfig", "TraditionalMTLSurgeryConfig", "TSVMergingConfig",
           "TSVMergingSurgeryConfig", "WeightAveragingConfig", "WeightAveragingSurgeryConfig",
           "WUDIMergingConfig", "WUDIMergingSurgeryConfig"]
