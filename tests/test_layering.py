"""The import structure the design promises, checked from the source.

- The layers stack one way: cli → runtime → planner → dsl; `dsl` imports neither torch
  nor lark outside its parser.
- No import cycle among the modules of any layer, counting imports inside functions too
  (a function-level import hides a cycle from Python, not from a reader).
- No package binds a name that is also one of its submodules, so `pkg.name` always means
  one thing.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("dsl", "planner", "runtime", "cli")
# What each layer may import of ours.
ALLOWED = {
    "dsl": {"dsl"},
    "planner": {"dsl", "planner", "plans"},
    "runtime": {"dsl", "planner", "runtime", "plans"},
    "cli": {"dsl", "planner", "runtime", "cli", "plans"},
}


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return "meshplan." + ".".join(parts)


def _sources() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for layer in LAYERS:
        for path in sorted((ROOT / layer).rglob("*.py")):
            found[_module(path)] = path
    return found


SOURCES = _sources()


def _imports(module: str, path: Path) -> set[str]:
    """Every module of ours that `module` imports, anywhere in its body."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            # `from pkg import sub` imports the submodule; `pkg` itself counts only for
            # names that are not submodules (its __init__ runs first either way).
            subs = [f"{stem}.{a.name}" for a in node.names]
            names = subs + ([stem] if any(n not in SOURCES for n in subs) else [])
        else:
            continue
        out.update(n for n in names if n in SOURCES)
    out.discard(module)
    return out


GRAPH = nx.DiGraph()
for _name, _path in SOURCES.items():
    GRAPH.add_node(_name)
    for _target in _imports(_name, _path):
        # A package's __init__ is imported on the way to any submodule; an edge to the
        # package itself is an edge to its __init__.
        GRAPH.add_edge(_name, _target)


def _layer(module: str) -> str:
    return module.split(".")[1]


@pytest.mark.parametrize("layer", LAYERS)
def test_no_import_cycle_inside_a_layer(layer: str) -> None:
    inside = GRAPH.subgraph(m for m in GRAPH if _layer(m) == layer)
    cycles = [c for c in nx.simple_cycles(inside) if len(c) > 1]
    assert not cycles, "import cycles: " + "; ".join(" → ".join([*c, c[0]]) for c in cycles[:5])


@pytest.mark.parametrize("layer", LAYERS)
def test_layers_import_only_downwards(layer: str) -> None:
    wrong = sorted(
        f"{a} imports {b}"
        for a, b in GRAPH.edges
        if _layer(a) == layer and _layer(b) not in ALLOWED[layer]
    )
    assert not wrong, "\n".join(wrong)


def test_dsl_imports_no_torch_and_only_the_parser_imports_lark() -> None:
    offenders = []
    for module, path in SOURCES.items():
        if _layer(module) != "dsl":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                roots = {node.module.split(".")[0]}
            else:
                continue
            if "torch" in roots or ("lark" in roots and module != "meshplan.dsl.parser"):
                offenders.append(f"{module}: {sorted(roots)}")
    assert not offenders, offenders


def _bound_names(path: Path) -> set[str]:
    """Names a package's __init__ binds at module level (imports, defs, assignments)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom | ast.Import):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def test_no_package_name_shadows_a_submodule() -> None:
    shadows = []
    for module, path in SOURCES.items():
        if path.name != "__init__.py":
            continue
        submodules = {m.rsplit(".", 1)[1] for m in SOURCES if m.rsplit(".", 1)[0] == module}
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in tree.body:
            if not isinstance(node, ast.ImportFrom):
                continue
            for alias in node.names:
                bound = alias.asname or alias.name
                # `from . import sub` binds the submodule itself: not a shadow.
                if bound in submodules and not (node.level == 1 and node.module is None):
                    shadows.append(f"{module}.{bound}")
        for name in _bound_names(path) - {a.asname or a.name for n in tree.body
                                          if isinstance(n, ast.ImportFrom) for a in n.names}:
            if name in submodules:
                shadows.append(f"{module}.{name}")
    assert not shadows, shadows


def test_the_graph_sees_the_code() -> None:
    """The checks above are only as good as the graph: it must see known edges."""
    assert GRAPH.has_edge("meshplan.runtime.parallel.apply", "meshplan.planner.program")
    assert GRAPH.has_edge("meshplan.cli.main", "meshplan.cli.console") or any(
        b.startswith("meshplan.cli.") for b in GRAPH.successors("meshplan.cli.main"))
    assert len(SOURCES) > 60
