"""Packages never import upward, and no module imports itself back.

The floors, bottom first: planner (pure Python: cost model, Plan, run-record format, CLI dispatch)
<- executor (PyTorch trainer) <- calibration (measured runs, fits, oracle). A module may import its
own floor or a lower one, never a higher one, not even inside a function body (a lazy upward import
is still a dependency: `planner` must work where executor/calibration are not installed). The
import graph among all their modules has no cycle.

The graph is read with `ast` from every `import` / `from ... import` anywhere in a module
(functions, `if TYPE_CHECKING:` blocks included), relative imports resolved.
"""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
FLOORS = {"planner": 0, "executor": 1, "calibration": 2}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for top in FLOORS for p in sorted((ROOT / top).rglob("*.py"))}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The longest known module that `name` names or lies in (`a.b.func` -> `a.b`)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in known:
            return candidate
        parts.pop()
    return None


def _imported_names(module: str, path: Path) -> list[str]:
    """Dotted names each import statement of the module reaches, relative ones made absolute."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from a.b import c` reaches module a.b.c when c is one, else a.b
            names += [f"{base}.{alias.name}" if base else alias.name for alias in node.names]
    return names


def import_graph() -> nx.DiGraph:
    known = _modules()
    graph = nx.DiGraph()
    graph.add_nodes_from(known)
    for module, path in known.items():
        for name in _imported_names(module, path):
            target = _resolve(name, known)
            if target is not None and target != module:
                graph.add_edge(module, target)
    return graph


def _floor(module: str) -> int:
    return FLOORS[module.split(".")[0]]


def test_graph_sees_lazy_and_relative_imports(tmp_path):
    """The reader finds imports inside functions and resolves `from . import x` / `from .. import y`."""
    pkg = tmp_path / "planner" / "sub"
    pkg.mkdir(parents=True)
    source = "def f():\n    from executor.launch import launch\n    from . import a\n    from .. import b\n"
    (pkg / "m.py").write_text(source)
    names = _imported_names("planner.sub.m", pkg / "m.py")
    assert names == ["executor.launch.launch", "planner.sub.a", "planner.b"]


def test_no_upward_imports():
    graph = import_graph()
    upward = sorted(f"{a} -> {b}" for a, b in graph.edges if _floor(a) < _floor(b))
    assert not upward, ("a lower floor imports a higher one (planner <- executor <- calibration): "
                        + "; ".join(upward))


def test_no_import_cycles():
    graph = import_graph()
    cycles = sorted(" -> ".join([*c, c[0]]) for c in nx.simple_cycles(graph))
    assert not cycles, "import cycle(s): " + "; ".join(cycles)
