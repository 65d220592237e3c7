"""Layer 1, datasets: the real tasks' folder layouts, `…Val` splits, class names and templates.
May import storage."""
from taskmerge.datasets.base import ArrayDataset, TaskData, stack_dataset  # noqa: F401
from taskmerge.datasets.real import DatasetLayoutError  # noqa: F401
from taskmerge.datasets.registry import BENCHMARKS, PAPER_8, REAL_TASKS, TALL_8, TALL_14, TALL_20, get_task  # noqa: F401
from taskmerge.datasets.templates import get_templates  # noqa: F401
