"""The package's layout is its architecture: layers import downwards only, and the core is pure torch.

Read from the source (``ast``), not by importing, so a lazy or conditional import counts too.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_lora"

# Lower layers first; a module may import its own layer and the ones before it.
LAYERS = ["_version", "errors", "core", "integration", "demo", "experiments", "cli"]
CORE_MAY_IMPORT = {"torch", "safetensors", "lightning_lora"}
MOST_LINES = 400
WHY_LONGER = "longer than 400 lines because"  # what a docstring says to be allowed more


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imported(path: Path, name: str) -> set[str]:
    """Every module ``path`` imports, absolute (relative imports resolved against ``name``)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "import_module":
            if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
                names.add(node.args[0].value)
    return names


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def internal_imports(all_modules: dict[str, Path]) -> dict[str, set[str]]:
    graph = {}
    for name, path in all_modules.items():
        graph[name] = {m for m in imported(path, name) if m in all_modules and m != name}
    return graph


def test_every_layer_imports_only_the_layers_below_it():
    wrong = []
    for name, targets in internal_imports(modules()).items():
        if layer_of(name) == "__init__":
            continue  # the lazy public API names every layer, loading nothing until asked
        for target in targets:
            if layer_of(target) == "__init__":
                wrong.append(f"{name} imports the package root {target}")
            elif LAYERS.index(layer_of(target)) > LAYERS.index(layer_of(name)):
                wrong.append(f"{name} ({layer_of(name)}) imports {target} ({layer_of(target)}), a layer above it")
    assert not wrong, "\n".join(wrong)


def test_the_core_imports_torch_safetensors_and_the_standard_library_only():
    wrong = []
    for name, path in modules().items():
        if layer_of(name) != "core":
            continue
        for target in imported(path, name):
            top = target.split(".")[0]
            if top in CORE_MAY_IMPORT or top in sys.stdlib_module_names or top == "__future__":
                if top == "lightning_lora" and layer_of(target) not in ("core", "_version", "errors"):
                    wrong.append(f"{name} imports {target}")
                continue
            wrong.append(f"{name} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_no_import_circle():
    graph = internal_imports(modules())
    # A package's __init__ importing its own modules is not a circle worth naming.
    edges = {n: {t for t in ts if not (t.startswith(n + ".") and n in graph)} for n, ts in graph.items()}
    state: dict[str, int] = defaultdict(int)  # 0 new, 1 on the path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state[nxt] == 1:
                return [*path[path.index(nxt) :], nxt]
            if state[nxt] == 0 and (circle := visit(nxt)):
                return circle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if state[node] == 0 and (circle := visit(node)):
            pytest.fail("import circle: " + " -> ".join(circle))


def test_at_most_four_modules_at_the_top_and_every_subpackage_says_what_it_owns():
    top = sorted(p.name for p in PACKAGE.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file())
    plain = [n for n in top if n.endswith(".py")]
    assert len(plain) <= 4, plain
    for package in (p for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()):
        doc = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
        assert "May import" in doc or "may import" in doc, f"{package.name}/__init__.py: say what it may import"


def test_no_module_is_long_without_saying_why():
    long = []
    for name, path in modules().items():
        lines = len(path.read_text().splitlines())
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        if lines > MOST_LINES and WHY_LONGER not in doc:
            long.append(f"{name}: {lines} lines")
    assert not long, long


def test_no_two_modules_share_a_name_across_the_package():
    """Two files called alike in different layers are the confusion the redesign removed."""
    by_name = defaultdict(list)
    for name, path in modules().items():
        if path.name != "__init__.py":
            by_name[path.stem].append(name)
    assert not [names for names in by_name.values() if len(names) > 1]
