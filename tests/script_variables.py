"""The entry scripts' top-level variables and typed config class, read with ast (no script runs),
so that tests build exactly the config a script would, with a few settings replaced."""
from __future__ import annotations

import ast
import dataclasses
import os

import taskmerge.runs.methods as methods
from taskmerge.runs import registry, script_configs
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


def runs_on_any_base(script: str) -> bool:
    """Whether the script ends in `main_on_any_base(...)` (src/main_Surgery.py)."""
    return any(isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
               and node.func.id == "main_on_any_base" for node in ast.walk(_tree(script)))


def base_defaults(script: str, base: str) -> dict:
    """What runs/cli.py `main_on_any_base` adds to `script`'s variables for the Surgery base `base`:
    the base method's settings from its own script, then the settings its name fixes."""
    method, fixed = registry.base(base)
    own = {f.name for f in dataclasses.fields(method.settings)}
    mine = script_variables(script)
    added = {k: v for k, v in script_variables(method.script).items() if k in own and k not in mine}
    added.update({k: v for k, v in fixed.items() if k not in mine})
    return added


def script_config_class(script: str, base: str | None = None) -> type:
    """The config class the script's `main(run, ConfigClass, globals())` line names (for a script
    on any base: the Surgery config of `base`, default its `method_name`)."""
    if runs_on_any_base(script):
        return script_configs.surgery_config(registry.base(base or script_variables(script)["method_name"])[0])
    for node in ast.walk(_tree(script)):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "main"
                and len(node.args) >= 2 and isinstance(node.args[1], ast.Name)):
            name = node.args[1].id
            return getattr(script_configs, name, None) or getattr(methods, name)
    raise AssertionError(f"{script} has no main(run, ConfigClass, globals()) call")


def script_config(script: str, **replaced):
    """The script's typed config with `replaced` settings, checked as the script would check it.
    Tests compute on the CPU whatever the machine has: a script's `device="auto"` becomes "cpu"
    unless a test sets it."""
    variables = script_variables(script)
    base = None
    if runs_on_any_base(script):
        base = replaced.get("method_name", variables["method_name"])
        variables = {**base_defaults(script, base), **variables}
    if "device" in variables:
        variables["device"] = "cpu"
    return from_values(script_config_class(script, base), {**variables, **replaced}, script)


def config_from(script: str, settings: dict):
    """`script`'s typed config with `settings` in place of its variables; shared fixture settings
    the script does not have (resume_dir for a data-free one, save_dir, seed) are left out."""
    known = script_variables(script)
    shared = ("save_dir", "resume_dir", "seed")
    return script_config(script, **{k: v for k, v in settings.items() if k in known or k not in shared})
