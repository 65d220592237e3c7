"""Datasets: the 8 real tasks' folder layouts and the embedded offline benchmark."""
from .base import ArrayDataset, TaskData, stack_dataset  # noqa: F401
