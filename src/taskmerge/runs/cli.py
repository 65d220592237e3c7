"""An entry script's `if __name__ == "__main__":` line: overrides, typed config, run, one-line errors.

`main(run, ConfigClass, globals())` parses `--key=value` against the script's variables, builds and
checks its typed config (runs/script_configs.py) and calls `run(config, script=...)`. An InputError
(bad file, folder or setting) prints `error: <message>` on one line to stderr and exits 2; any other
exception is a bug and keeps its traceback. `--debug=True` or TASKMERGE_DEBUG=1 shows the traceback
of input errors too.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Any, Callable, Sequence

from taskmerge.compute import cpu_paths
from taskmerge.compute.devices import device_type
from taskmerge.compute.distributed import PeerRefused, stop_together
from taskmerge.runs import methods as _builtin_methods  # noqa: F401 (declares them: the bases)
from taskmerge.runs import registry
from taskmerge.runs.config import configure, script_variables
from taskmerge.runs.script_configs import surgery_config
from taskmerge.runs.settings import from_values
from taskmerge.runs.setup import EMBEDDED_MODELS, resolved_model_name
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
        pin_cpu_paths(config, as_script=namespace.get("__name__") == "__main__"
                      and cpu_paths.started_as(namespace.get("__file__", "")))
        return run(config, script=script)
    except InputError as error:
        if debug:
            raise
        if not isinstance(error, PeerRefused):  # under torchrun the refusing rank says why, once
            print("error: " + " ".join(str(error).split()), file=sys.stderr, flush=True)
        stop_together(error)
        raise SystemExit(EXIT_INPUT_ERROR) from None


def main_on_any_base(run: Callable[..., Any], namespace: dict[str, Any],
                     argv: Sequence[str] | None = None) -> Any:
    """`main` for a script that runs on any Surgery base (src/main_Surgery.py): its `method_name`
    (or `--method_name=`) picks a declared base; the base method's settings take their defaults from
    the base's own entry script, then the names the base fixes, then `--key=value`, and the run's
    config is the base's Surgery config (script_configs `surgery_config`)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug=True" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        base_name = namespace.get("method_name")
        for arg in argv:
            if arg.startswith("--method_name="):
                base_name = arg.split("=", 1)[1].strip("'\"")
        method, fixed = registry.base(str(base_name))
        script = method.script
        if not os.path.isabs(script):
            script = os.path.join(os.path.dirname(os.path.abspath(namespace.get("__file__", "."))), script)
        own = {f.name for f in dataclasses.fields(method.settings)}
        defaults = {k: v for k, v in script_variables(script).items() if k in own and k not in namespace}
        defaults.update({k: v for k, v in fixed.items() if k not in namespace})
        print(f"Base {base_name}: {method.name}'s settings from {os.path.basename(script)}"
              + (f", with {', '.join(f'{k}={v!r}' for k, v in fixed.items())} (the base's name)"
                 if fixed else ""), flush=True)
        namespace.update(defaults)
    except InputError as error:
        if debug:
            raise
        print("error: " + " ".join(str(error).split()), file=sys.stderr, flush=True)
        raise SystemExit(EXIT_INPUT_ERROR) from None
    return main(run, surgery_config(method), namespace, argv)


def wants_pinned_cpu_paths(config) -> bool:
    """Whether a run computes with `compute/cpu_paths.PINNED`: "auto" pins the embedded benchmark on
    the CPU (its README numbers are the pinned paths'), a real model keeps the machine's fastest
    paths; a build of the embedded benchmark is always pinned (embedded/build.py)."""
    setting = getattr(config, "cpu_paths", None)
    if setting is None or setting == "native":
        return False
    if setting == "pinned":
        return True
    return (resolved_model_name(config.model_name, config.checkpoint_dir) in EMBEDDED_MODELS
            and device_type(config.device) == "cpu")


def pin_cpu_paths(config, as_script: bool) -> None:
    """Restart an entry script with the pinned CPU paths where its run wants them and its process
    started without them. A library call (or a script run inside another program, as the tests do)
    cannot restart its caller: with "auto" it computes on the native paths (the run's log and report
    say so), with "pinned" it is refused."""
    if not wants_pinned_cpu_paths(config) or cpu_paths.is_pinned():
        return
    if as_script and not cpu_paths.restarted():
        print("Restarting with the pinned CPU code paths ("
              + " ".join(f"{k}={v}" for k, v in cpu_paths.PINNED.items())
              + "; setting cpu_paths, README 'Results on the embedded benchmark')", flush=True)
        cpu_paths.restart_pinned()
    if config.cpu_paths == "pinned":
        raise ConfigError("setting cpu_paths='pinned': this process started without "
                          + ", ".join(f"{k}={v}" for k, v in cpu_paths.PINNED.items())
                          + " (they take effect only before torch computes); set them in the "
                          "environment, or run the entry script, which restarts itself with them")
