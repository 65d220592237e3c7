"""scripts/reproduce_embedded_tables.sh, checked without running it (it takes an hour): bash syntax,
and in its dry run every command names an existing script and only that script's own variables."""
import ast
import os
import shlex
import subprocess

import taskmerge.runs.methods  # noqa: F401 (declares the bases)
from taskmerge.runs import registry

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "scripts", "reproduce_embedded_tables.sh")


def script_variables(path):
    tree = ast.parse(open(path).read())
    return {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
            if isinstance(t, ast.Name)}


def test_bash_syntax():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


def test_dry_run_commands_use_existing_scripts_and_their_own_variables(tmp_path):
    run = subprocess.run(["bash", SCRIPT, str(tmp_path / "logs")], env={**os.environ, "DRY_RUN": "1"},
                         capture_output=True, text=True, timeout=60, check=True)
    commands = [shlex.split(line) for line in run.stdout.splitlines()]
    runs = [c for c in commands if c[0].startswith("OMP_NUM_THREADS=1")]
    assert all(c[1] == "MKL_NUM_THREADS=1" for c in runs)
    scripts = [c[c.index("python3") + 1] for c in commands]
    assert scripts[0] == "src/build_embedded_benchmark.py" and scripts[-1] == "src/summarize_results.py"
    for cmd, script in zip(commands, scripts):
        path = os.path.join(REPO, script)
        assert os.path.exists(path), script
        known = script_variables(path)
        keys = [arg[2:].split("=", 1)[0] for arg in cmd if arg.startswith("--")]
        if script == "src/main_Surgery.py":  # and its base's settings, from the base's own script
            base = next(arg.split("=", 1)[1] for arg in cmd if arg.startswith("--method_name="))
            known |= script_variables(os.path.join(REPO, "src", registry.base(base)[0].script))
        assert keys and set(keys) <= known, (script, set(keys) - known)
        if "--log_dir=" + str(tmp_path / "logs") not in cmd and script != "src/build_embedded_benchmark.py":
            raise AssertionError(f"{script} does not log into the given log_dir")
    # every README row's run is there, once: 16 runs for the results table's 17 rows (zero-shot and
    # individual come from one), 8 bases × 2 Surgery variants, and online Surgery; then the 2025
    # records and DARE / PCB (issue 14): 8 data-free runs and 8 bases × 2 Surgery variants; the
    # seeds' missing rows (issue 20): Traditional MTL, Fisher, RegMean, RegMean++, each a base too
    assert len(runs) == 16 + 8 * 2 + 1 + 8 + 8 * 2 + 4 + 4 * 2 and len({tuple(c) for c in runs}) == len(runs)
    assert not os.path.exists(tmp_path / "logs")  # a dry run writes nothing
