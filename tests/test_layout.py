"""The repository's shape: one-way layering, the lark boundary, the installed namespace."""

from __future__ import annotations

import ast
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from .conftest import ROOT

LAYERS = ("dsl", "planner", "runtime", "cli")
# What each layer must never import (its own rank and below are fine).
FORBIDDEN = {
    "dsl": {"meshplan.planner", "meshplan.runtime", "meshplan.cli", "torch", "transformers", "numba",
            "networkx"},
    "planner": {"meshplan.runtime", "meshplan.cli"},
    "runtime": {"meshplan.cli"},
    "cli": set(),
}


def _imports(path: Path, package: str) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = parts[: len(parts) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            found.add(module)
    return found


def _modules(layer: str) -> list[tuple[Path, str]]:
    out = []
    for path in sorted((ROOT / layer).rglob("*.py")):
        rel = path.relative_to(ROOT / layer).with_suffix("")
        parts = ["meshplan", layer, *rel.parts]
        package = ".".join(parts if path.name == "__init__.py" else parts[:-1])
        out.append((path, package.removesuffix(".__init__")))
    return out


@pytest.mark.parametrize("layer", LAYERS)
def test_layers_import_only_downwards(layer: str) -> None:
    bad = []
    for path, package in _modules(layer):
        for module in _imports(path, package):
            if any(module == f or module.startswith(f + ".") for f in FORBIDDEN[layer]):
                bad.append(f"{path.relative_to(ROOT)} imports {module}")
    assert bad == []


def test_only_the_parser_imports_lark() -> None:
    users = [str(p.relative_to(ROOT)) for layer in LAYERS for p, pkg in _modules(layer)
             if any(m == "lark" or m.startswith("lark.") for m in _imports(p, pkg))]
    assert users == ["dsl/parser.py"]


def test_top_level_is_fixed() -> None:
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    if not tracked.strip():
        pytest.skip("not a git checkout")
    top = {line.split("/")[0] for line in tracked.splitlines()}
    allowed = {"dsl", "planner", "runtime", "cli", "plans", "tests", "bench", ".ci", "pyproject.toml",
               "README.md", ".gitignore"}
    assert top <= allowed, top - allowed


def test_wheel_holds_the_namespace_and_data(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("meshplan-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for expected in ("meshplan/dsl/grammar.lark", "meshplan/dsl/parser.py", "meshplan/cli/main.py",
                     "meshplan/plans/llama.plan", "meshplan/plans/fsdp.plan", "meshplan/runtime/__init__.py",
                     "meshplan/planner/__init__.py", "meshplan/planner/graph/__init__.py"):
        assert expected in names
    assert not any(n.split("/")[0] in LAYERS for n in names), "a layer leaked to the top level"
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "plan = meshplan.cli.main:entry" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_graph_privates_stay_in_the_graph_package() -> None:
    """A ModelGraph's underscore fields are the graph package's own: nothing else reads or
    sets them (the graph is frozen; its builder passes everything to the constructor)."""
    from dataclasses import fields

    from meshplan.planner.graph import ModelGraph

    private = {f.name for f in fields(ModelGraph) if f.name.startswith("_")}
    users = []
    for layer in (*LAYERS, "tests", "bench"):
        for path in sorted((ROOT / layer).rglob("*.py")):
            if path.is_relative_to(ROOT / "planner" / "graph"):
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Attribute) and node.attr in private:
                    users.append(f"{path.relative_to(ROOT)}:{node.lineno} uses .{node.attr}")
    assert private and users == []
