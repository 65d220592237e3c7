"""The entry scripts' top-level variables and typed config class, read with ast (no script runs),
so that tests build exactly the config a script would, with a few settings replaced."""
from __future__ import annotations

import ast
import os

from taskmerge.runs import script_configs
from taskmerge.runs.settings import from_values

SRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
SCRIPTS = sorted(f for f in os.listdir(SRC) if f.endswith(".py"))


def _tree(script: str) -> ast.Module:
    with open(os.path.join(SRC, script)) as f:
        return ast.parse(f.read(), script)


def script_variables(script: str) -> dict:
    """{name: value} of the script's top-level `name = <literal>` lines."""
    return {node.targets[0].id: ast.literal_eval(node.value) for node in _tree(script).body
            if isinstance(node, ast.Assign) and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)}


def script_config_class(script: str) -> type:
    """The config class the script's `main(run, ConfigClass, globals())` line names."""
    for node in ast.walk(_tree(script)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "main"
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Name)):
            return getattr(script_configs, node.args[1].id)
    raise AssertionError(f"{script} has no main(run, ConfigClass, globals()) call")


def script_config(script: str, **replaced):
    """The script's typed config with `replaced` settings, checked as the script would check it.
    Tests compute on the CPU whatever the machine has: a script's `device="auto"` becomes "cpu"
    unless a test sets it."""
    variables = script_variables(script)
    if "device" in variables:
        variables["device"] = "cpu"
    return from_values(script_config_class(script), {**variables, **replaced}, script)


def config_from(script: str, settings: dict):
    """`script`'s typed config with `settings` in place of its variables; shared fixture settings
    the script does not have (resume_dir for a data-free one, save_dir, seed) are left out."""
    known = script_variables(script)
    shared = ("save_dir", "resume_dir", "seed")
    return script_config(script, **{k: v for k, v in settings.items() if k in known or k not in shared})
