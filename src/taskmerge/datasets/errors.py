"""The error every dataset reader raises for data it cannot use: its own module, so that the class-name
tables and the readers all import it from below them, not from one another."""
from __future__ import annotations

from taskmerge.storage.errors import InputError


class DatasetLayoutError(InputError):
    """A task's data is missing or not in the layout its reader expects."""
