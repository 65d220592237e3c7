"""An entry script's `if __name__ == "__main__":` line: overrides, typed config, run, one-line errors.

`main(run, ConfigClass, globals())` parses `--key=value` against the script's variables, builds and
checks its typed config (runs/script_configs.py) and calls `run(config, script=...)`. An InputError
(bad file, folder or setting) prints `error: <message>` on one line to stderr and exits 2; any other
exception is a bug and keeps its traceback. `--debug=True` or TASKMERGE_DEBUG=1 shows the traceback
of input errors too.
"""
from __future__ import annotations

import os
import sys
from typing import Any, Callable, Sequence

from taskmerge.compute.distributed import PeerRefused, stop_together
from taskmerge.runs.config import configure
from taskmerge.runs.settings import from_values
from taskmerge.storage.errors import ConfigError, InputError

EXIT_INPUT_ERROR = 2
DEBUG_ENV = "TASKMERGE_DEBUG"


def split_debug(argv: Sequence[str]) -> tuple[bool, list[str]]:
    """(debug?, the other arguments): `--debug=True|False`, else the TASKMERGE_DEBUG env var."""
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0")
    rest = []
    for arg in argv:
        if arg.startswith("--debug="):
            value = arg.split("=", 1)[1]
            if value not in ("True", "False"):
                raise ConfigError(f"--debug={value}: expected True or False")
            debug = value == "True"
        else:
            rest.append(arg)
    return debug, rest


def main(run: Callable[..., Any], config_class: type, namespace: dict[str, Any],
         argv: Sequence[str] | None = None) -> Any:
    """Build `config_class` from the script's variables and overrides, then `run(config, script=…)`."""
    argv = sys.argv[1:] if argv is None else argv
    script = namespace.get("__file__", "the script")
    debug = "--debug=True" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        debug, rest = split_debug(argv)
        config = from_values(config_class, configure(namespace, rest), source=os.path.basename(script))
        return run(config, script=script)
    except InputError as error:
        if debug:
            raise
        if not isinstance(error, PeerRefused):  # under torchrun the refusing rank says why, once
            print("error: " + " ".join(str(error).split()), file=sys.stderr, flush=True)
        stop_together(error)
        raise SystemExit(EXIT_INPUT_ERROR) from None
