"""The folders are the layers: no module imports from a later layer (read with ast, nothing runs)."""
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
    for folder, _, files in os.walk(package_dir):
        for name in sorted(files):
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            rel = os.path.relpath(path, package_dir)
            parts = rel[:-3].split(os.sep)
            is_package = parts[-1] == "__init__"
            module = ".".join(["taskmerge"] + (parts[:-1] if is_package else parts))
            if rel == "__init__.py":
                continue
            own = parts[0] if parts[0] in rank else None
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


def test_no_module_imports_from_a_later_layer():
    problems = upward_imports(PACKAGE_DIR)
    assert not problems, "upward imports:\n" + "\n".join(problems)


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
