"""Datasets: the 8 real tasks' folder layouts and the embedded offline benchmark."""
from .base import ArrayDataset, TaskData, stack_dataset  # noqa: F401
from .real import DatasetLayoutError  # noqa: F401
from .registry import PAPER_8, REAL_TASKS, TALL_8, TALL_14, TALL_20, get_task  # noqa: F401
from .templates import get_templates  # noqa: F401
