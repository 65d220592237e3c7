"""The one base class of errors that a user's input causes, as opposed to bugs.

An `InputError` says in one message which file or setting is wrong, what is wrong with it and how
to fix it; entry scripts print that message alone (no traceback) and exit non-zero. Everything else
that escapes is a bug and keeps its traceback."""
from __future__ import annotations


class InputError(ValueError):
    """Bad input (a file, a folder, a setting): the message names it and the fix."""


class ConfigError(InputError):
    """A script setting that is unknown, of the wrong type, or out of its range or choices."""
