"""Import hygiene (issue 14): no import cycles among the project's packages, and the maths modules that do
not project load neither umap-learn nor numba, nor scikit-learn or scipy (the libraries whose import took
0.5-1 s; without them each module imports in well under 0.3 s, bench/README.md)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ingest", "store", "analysis", "views", "dashboard")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> project modules it imports anywhere in its source (top level or inside functions)."""
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_pkg = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                    anchor = anchor[: len(anchor) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                # `from pkg import mod` imports the submodule pkg.mod; `from mod import name` imports mod
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in files:  # `import a.b.c` of a non-module name: its module
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_graph_sees_function_level_imports():
    graph = import_graph()
    assert "analysis.engine.neighbours" in graph["analysis.project"]
    assert "analysis.engine.neighbours" in graph["analysis.engine.jit"]  # imported inside warm_up
    assert "store" in graph and graph["views.service"] & {"store.queries", "store.connect"}


def test_no_import_cycles_in_the_project():
    assert find_cycle(import_graph()) is None


NON_PROJECTING = [
    "analysis",
    "analysis.tokens",
    "analysis.engine.groups",
    "analysis.metrics",
    "analysis.engine.neighbours",
    "analysis.probe",
    "analysis.measures",
    "analysis.residualize",
    "analysis.crossfit",
    "analysis.synthetic",
    "analysis.divergence",
    "analysis.verdict",
    "analysis.guard",
    "analysis.basis",
    "analysis.project",
    "analysis.engine.jit",
    "analysis.view",
    "analysis.clusters",
]
HEAVY = ("umap", "numba", "pynndescent", "sklearn", "scipy")  # imported inside the functions that use them


@pytest.mark.parametrize("module", NON_PROJECTING)
def test_importing_loads_no_heavy_library(module):
    code = (
        f"import sys, json; import {module}; "
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_token_module_loads_no_heavy_library():
    """`import analysis.tokens` (what the ingest and store sides need) pulls in numpy only."""
    code = (
        "import sys, json; import analysis.tokens; print(json.dumps(sorted(m for m in "
        "('umap', 'numba', 'sklearn', 'scipy', 'usearch') if m in sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_sql_lives_in_store_only():
    """All SQL in store/ (issue 31 item 3: views/synthetic.py held a query): outside it, no string passed to
    a connection's execute/sql/query (a constant or an f-string) starts with a SQL verb, in the packages and
    app.py. The SQL tab's example query is user text, shown in a text box and run through the sandbox."""
    import re

    verb = re.compile(
        r"^\s*(SELECT|INSERT|UPDATE|DELETE|CREATE|DROP|ALTER|WITH|COPY|ATTACH|PRAGMA|SET)\b", re.I
    )
    found = []

    def text(arg) -> str:
        """The literal start of a string argument: a constant, or an f-string's first literal part."""
        if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
            return arg.value
        if isinstance(arg, ast.JoinedStr) and arg.values and isinstance(arg.values[0], ast.Constant):
            return str(arg.values[0].value)
        return ""

    paths = [p for pkg in ("ingest", "analysis", "views", "dashboard") for p in (ROOT / pkg).rglob("*.py")]
    for path in [*paths, ROOT / "app.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in ("execute", "sql", "executemany", "query")
                and node.args
                and verb.match(text(node.args[0]))
            ):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "first_row":
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} (first_row)")
    assert not found, found
