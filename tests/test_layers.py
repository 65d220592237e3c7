"""The folders are the layers: no module imports from a later layer, and within a folder the imports
run one way (no import circle). Read with ast, nothing runs."""
import ast
import os

import taskmerge
from taskmerge import LAYERS

PACKAGE_DIR = os.path.dirname(os.path.abspath(taskmerge.__file__))


def _imported_modules(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, absolute dotted name) of every import in `tree`, function-level ones included."""
    package = module if is_package else module.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            # `from taskmerge import merging` imports the subpackage: count each name as a module
            out += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return out


def _modules(package_dir: str):
    """(path, rel, dotted module name, is_package) of every .py file under `package_dir`."""
    for folder, _, files in os.walk(package_dir):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, package_dir)
            parts = rel[:-3].split(os.sep)
            is_package = parts[-1] == "__init__"
            module = ".".join(["taskmerge"] + (parts[:-1] if is_package else parts))
            yield path, rel, module, is_package


def _layer_of(dotted: str) -> str | None:
    parts = dotted.split(".")
    if parts[0] != "taskmerge" or len(parts) < 2 or parts[1] not in LAYERS:
        return None
    return parts[1]


def upward_imports(package_dir: str, layers=LAYERS) -> list[str]:
    """'file:line imports X (layer a → later layer b)' for every upward import under `package_dir`,
    and 'file: not in a layer folder' for a module outside them."""
    rank = {name: i for i, name in enumerate(layers)}
    problems = []
    for path, rel, module, is_package in _modules(package_dir):
        if rel == "__init__.py":
            continue
        top = rel.split(os.sep)[0]
        own = top if top in rank else None
        if own is None:
            problems.append(f"{rel}: not in a layer folder ({', '.join(layers)})")
            continue
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
        for line, target in _imported_modules(tree, module, is_package):
            layer = _layer_of(target)
            if layer is not None and rank[layer] > rank[own]:
                problems.append(f"{rel}:{line} imports {target} ({own} → later layer {layer})")
    return problems


def import_cycles(package_dir: str) -> list[str]:
    """One 'a.py:line → b.py:line → a.py' per import circle among the modules of one folder.

    Every import counts, function-level ones included: a lazy import only hides a circle. An imported
    name resolves to the module that defines it (`from taskmerge.x import y` is module x.y where y is
    a module, else x); imports across folders are the layer check's business."""
    files = {}  # dotted module -> (path, rel, is_package)
    for path, rel, module, is_package in _modules(package_dir):
        files[module] = (path, rel, is_package)
    edges: dict[str, dict[str, int]] = {m: {} for m in files}  # module -> {imported module: first line}
    for module, (path, rel, is_package) in files.items():
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
        for line, target in _imported_modules(tree, module, is_package):
            while target and target not in files:  # a name inside a module: the module
                target = target.rpartition(".")[0]
            if (target and target != module
                    and os.path.dirname(files[target][0]) == os.path.dirname(path)):
                edges[module].setdefault(target, line)
    # Tarjan's strongly connected components; a component of two or more modules holds a circle.
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            components.append(component)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    cycles = []
    for component in components:
        if len(component) < 2:
            continue
        start = min(component)
        paths = {start: [start]}  # shortest way round from `start` back to it, inside the component
        queue, cycle = [start], None
        while queue and cycle is None:
            v = queue.pop(0)
            for w in sorted(edges[v]):
                if w == start:
                    cycle = paths[v] + [start]
                    break
                if w in component and w not in paths:
                    paths[w] = paths[v] + [w]
                    queue.append(w)
        steps = [f"{files[a][1]}:{edges[a][b]}" for a, b in zip(cycle, cycle[1:])]
        cycles.append(" → ".join(steps + [files[start][1]])
                      + f" (all of {', '.join(sorted(files[m][1] for m in component))})")
    return sorted(cycles)


def test_no_module_imports_from_a_later_layer():
    problems = upward_imports(PACKAGE_DIR)
    assert not problems, "upward imports:\n" + "\n".join(problems)


def test_no_import_circle_within_a_folder():
    cycles = import_cycles(PACKAGE_DIR)
    assert not cycles, "import circles (move what both need into a module of its own):\n" + "\n".join(cycles)


def test_every_layer_is_a_folder():
    for layer in LAYERS:
        assert os.path.isfile(os.path.join(PACKAGE_DIR, layer, "__init__.py")), layer


def _write(root, rel, text):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def test_the_check_names_the_file_and_the_import(tmp_path):
    root = str(tmp_path / "taskmerge")
    _write(root, "__init__.py", "")
    _write(root, "storage/__init__.py", "")
    _write(root, "storage/atomic.py", "import os\nfrom taskmerge.storage import safe_pickle\n")
    _write(root, "models/__init__.py", "")
    _write(root, "models/heads.py", "from ..storage import atomic\nfrom . import encoders\n")
    assert upward_imports(root) == []
    # a function-level import, a relative one and a package-level one are all caught
    _write(root, "storage/checkpoints.py",
           "def f():\n    from taskmerge.models.heads import X\n")
    _write(root, "storage/reader.py", "from ..models import heads\n")
    _write(root, "storage/more.py", "from taskmerge import models\nimport taskmerge.runs.setup\n")
    _write(root, "stray.py", "")
    problems = upward_imports(root)
    assert ("storage/checkpoints.py:2 imports taskmerge.models.heads.X (storage → later layer models)"
            in problems)
    assert "storage/reader.py:1 imports taskmerge.models.heads (storage → later layer models)" in problems
    assert "storage/more.py:1 imports taskmerge.models (storage → later layer models)" in problems
    assert "storage/more.py:2 imports taskmerge.runs.setup (storage → later layer runs)" in problems
    assert any(p.startswith("stray.py: not in a layer folder") for p in problems)
    assert len(problems) == 5


def test_the_circle_check_sees_lazy_and_relative_imports(tmp_path):
    root = str(tmp_path / "taskmerge")
    _write(root, "__init__.py", "")
    _write(root, "datasets/__init__.py", "from taskmerge.datasets.registry import get_task\n")
    _write(root, "datasets/base.py", "import os\n")
    _write(root, "datasets/real.py", "from taskmerge.datasets.base import TaskData\nfrom . import base\n")
    _write(root, "datasets/registry.py", "from taskmerge.datasets import real\nimport taskmerge.datasets.base\n")
    _write(root, "storage/__init__.py", "")
    _write(root, "storage/checkpoints.py", "from taskmerge.datasets.real import X\n")  # another folder
    _write(root, "storage/hf.py", "from .checkpoints import Reader\n")
    assert import_cycles(root) == []
    # a function-level import back into a module that imports this one
    _write(root, "datasets/base.py", "import os\n\n\ndef f():\n    from .registry import get_task\n")
    # `from taskmerge.storage import hf` names the module hf; a name in a module names the module
    _write(root, "storage/checkpoints.py", "from taskmerge.storage import hf\n")
    cycles = import_cycles(root)
    assert cycles == [
        "datasets/base.py:5 → datasets/registry.py:2 → datasets/base.py "  # the shortest way round
        "(all of datasets/base.py, datasets/real.py, datasets/registry.py)",
        "storage/checkpoints.py:1 → storage/hf.py:1 → storage/checkpoints.py "
        "(all of storage/checkpoints.py, storage/hf.py)",
    ]
    # a module importing its own package's __init__, which imports it back, is a circle too
    _write(root, "datasets/base.py", "import os\n")
    _write(root, "datasets/real.py", "from taskmerge.datasets import get_task\n")
    assert import_cycles(root)[0].startswith(
        "datasets/__init__.py:1 → datasets/registry.py:1 → datasets/real.py:1 → datasets/__init__.py")
