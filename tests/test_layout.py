"""The layout shows the architecture: checked from the source, by walking every import.

Reads the packages with ``ast`` (nothing is imported), resolves every import of ours, at module
level and inside functions alike (a function-level import is still a dependency: it only hides a
cycle until the function runs); imports under ``if TYPE_CHECKING:`` are skipped, since they never
run. Then it checks the rules that ARCHITECTURE.md draws:

- no import cycle among our modules;
- the engine (``pipeline``) imports nothing from the application (``stages``, ``review``) nor from
  the stand-ins or the evaluation kit;
- ``review`` (all of stage 5) imports nothing from ``stages`` (later stages may import review);
- production code (``stages``, ``review``, ``evalkit``) never imports the stand-ins;
- stage code (``stages``, ``review``) uses the engine's public API only: no runner, executor,
  status or lock module, and no ``_private`` name of another package.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "review", "standins", "evalkit")
# The engine modules that stage code may not import: they drive stages, stages do not drive them.
ENGINE_INTERNALS = (
    "pipeline.runner",
    "pipeline.executors",
    "pipeline.ray_executor",
    "pipeline.status",
    "pipeline.locks",
)


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    line: int
    names: tuple[str, ...]  # the names taken with ``from target import ...`` (empty: ``import``)

    def __str__(self) -> str:
        what = f" ({', '.join(self.names)})" if self.names else ""
        return f"{self.source} -> {self.target}{what} [{module_path(self.source)}:{self.line}]"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_path(name: str) -> str:
    for candidate in (Path(*name.split(".")).with_suffix(".py"), Path(*name.split(".")) / "__init__.py"):
        if (REPO / candidate).exists():
            return candidate.as_posix()
    return name


def our_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import that can run: the module's and the functions', not ``if TYPE_CHECKING:`` ones."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def _with_packages(target: str, source: str, modules: dict[str, Path]) -> list[str]:
    """``target`` and the packages above it that importing it runs (not the importer's own)."""
    parts = target.split(".")
    above = {".".join(source.split(".")[:k]) for k in range(1, source.count(".") + 2)}
    chain = [".".join(parts[:k]) for k in range(1, len(parts) + 1)]
    return [m for m in chain if m in modules and (m == target or m not in above)]


def import_edges(modules: dict[str, Path]) -> list[Edge]:
    edges: list[Edge] = []
    for source, path in modules.items():
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in _import_nodes(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    for target in _with_packages(alias.name, source, modules):
                        edges.append(Edge(source, target, node.lineno, ()))
                continue
            base = node.module or ""
            if node.level:  # relative: from the importer's package (its own name for a package)
                package = source.split(".") if is_package else source.split(".")[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join([*package, *([base] if base else [])])
            taken: dict[str, list[str]] = {}  # target -> names taken from it by this statement
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if sub in modules:  # `from pkg import module`
                    for target in _with_packages(sub, source, modules):
                        taken.setdefault(target, [])
                    continue
                for target in _with_packages(base, source, modules):
                    taken.setdefault(target, []).extend([alias.name] if target == base else [])
            edges += [
                Edge(source, target, node.lineno, tuple(names))
                for target, names in taken.items()
                if target != source
            ]
    return edges


def cycles(modules: dict[str, Path], edges: list[Edge]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for e in edges:
        graph[e.source].add(e.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _package(module: str) -> str:
    return module.split(".")[0]


def violations() -> list[str]:
    modules = our_modules()
    edges = import_edges(modules)
    problems = []
    for component in cycles(modules, edges):
        inside = [str(e) for e in edges if e.source in component and e.target in component]
        problems.append("import cycle among " + ", ".join(component) + ":\n      " + "\n      ".join(inside))
    # One report per statement and rule (``from stages.x import y`` also runs ``stages``).
    named = {(e.source, e.line, _package(e.target)) for e in edges if e.target != _package(e.target)}
    for e in edges:
        src, dst = _package(e.source), _package(e.target)
        if e.target == dst and (e.source, e.line, dst) in named:
            continue
        if src == "pipeline" and dst in ("stages", "review", "standins", "evalkit"):
            problems.append(f"the engine imports the {dst} package: {e}")
        if src == "review" and dst == "stages":
            problems.append(f"review imports stages: {e}")
        if src in ("stages", "review", "evalkit") and dst == "standins":
            problems.append(f"production code imports the stand-ins: {e}")
        if src in ("stages", "review"):
            internal = [m for m in ENGINE_INTERNALS if e.target == m or e.target.startswith(f"{m}.")]
            if internal:
                problems.append(f"stage code imports an engine internal: {e}")
            private = [n for n in e.names if n.startswith("_")]
            if private and src != dst:
                problems.append(f"stage code imports private names of another package: {e}")
    return problems


def test_the_walk_sees_function_level_and_skips_type_checking_imports() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from pipeline.runner import WorkList\n"
        "def f():\n    from pipeline.io import atomic_path\n"
    )
    nodes = _import_nodes(ast.parse(source))
    assert sorted(n.module or "" for n in nodes if isinstance(n, ast.ImportFrom)) == ["pipeline.io", "typing"]


def test_layout() -> None:
    problems = violations()
    assert not problems, f"{len(problems)} layout problem(s):\n  " + "\n  ".join(problems)
