"""The layout shows the architecture: checked from the source, by walking every import.

Reads the packages with ``ast`` (nothing is imported), resolves every import of ours, at module
level and inside functions alike (a function-level import is still a dependency: it only hides a
cycle until the function runs); imports under ``if TYPE_CHECKING:`` are skipped, since they never
run. Then it checks the rules that ARCHITECTURE.md draws:

- no import cycle among our modules;
- the engine (``pipeline``) imports nothing from the application (``stages``) nor from the
  stand-ins or the evaluation kit;
- production code (``stages``, ``evalkit``) never imports the stand-ins;
- stage code uses the engine's public API only: no runner, executor, status or lock module, and no
  ``_private`` name of another package;
- stages depend forwards only: a stage's modules (its package, or its module) import earlier
  stages' public names, never a later stage's; the modules the stages share (``scores``,
  ``scoring``, ``tools``) import no stage; the composition root (``stages/__init__``, ``config``,
  ``doctor``) may import any;
- a stage reads its own config section (``self.cfg``) and another stage's only through
  ``self.section(Type)`` for a type it declares in ``uses``: no ``<x>.config.<other section>`` in a
  stage's modules, and no ``section(T)`` whose ``T`` its stage does not declare.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages", "standins", "evalkit")
# The application's composition root: it names every stage, so it may import any.
ROOT = ("stages", "stages.config", "stages.doctor")
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


def module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_path(name: str) -> str:
    for candidate in (Path(*name.split(".")).with_suffix(".py"), Path(*name.split(".")) / "__init__.py"):
        if (REPO / candidate).exists():
            return candidate.as_posix()
    return name


def our_modules(root: Path = REPO) -> dict[str, Path]:
    return {module_name(p, root): p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))}


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


@dataclass(frozen=True)
class StageHome:
    """Where a stage's code lives: its package (``stages.merge``) or its module (``stages.manifest``)."""

    home: str
    number: int
    name: str  # its config section
    uses: frozenset[str]  # the config types it declares (class names)

    def holds(self, module: str) -> bool:
        return module == self.home or module.startswith(self.home + ".")


def _class_attrs(tree: ast.AST, cls: str) -> dict[str, ast.expr]:
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            found: dict[str, ast.expr] = {}
            for n in node.body:
                if isinstance(n, ast.Assign):
                    found.update((t.id, n.value) for t in n.targets if isinstance(t, ast.Name))
                elif isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.value:
                    found[n.target.id] = n.value
            return found
    raise AssertionError(f"class {cls} not found")


def stage_homes(modules: dict[str, Path]) -> list[StageHome]:
    """The application's stages (``STAGES`` in ``stages/__init__.py``, read with ``ast``)."""
    tree = ast.parse(modules["stages"].read_text(encoding="utf-8"))
    specs = next(
        ast.literal_eval(n.value)
        for n in ast.walk(tree)
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.target.id == "STAGES"
    )
    homes = []
    for spec in specs:
        module, cls = spec.split(":")
        attrs = _class_attrs(ast.parse(modules[module].read_text(encoding="utf-8")), cls)
        uses = attrs.get("uses")
        names = frozenset(e.id for e in uses.elts) if isinstance(uses, ast.Tuple) else frozenset()
        parent = module.rsplit(".", 1)[0]
        homes.append(
            StageHome(
                parent if parent != "stages" else module,
                ast.literal_eval(attrs["number"]),
                ast.literal_eval(attrs["name"]),
                names,
            )
        )
    return homes


def config_problems(modules: dict[str, Path], homes: list[StageHome]) -> list[str]:
    """A stage module reaching into another stage's config section, or reading a section it does
    not declare."""
    sections = {h.name for h in homes}
    problems = []
    for module, path in modules.items():
        home = next((h for h in homes if h.holds(module)), None)
        if home is None:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr in sections - {home.name}
                and isinstance(node.value, ast.Attribute)
                and node.value.attr == "config"
            ):
                problems.append(
                    f"stage {home.number} reads config section {node.attr!r} without declaring it: "
                    f"{module_path(module)}:{node.lineno} (declare its type in `uses`, read self.section(T))"
                )
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "section"
                and node.args
                and isinstance(node.args[0], ast.Name)
                and node.args[0].id not in home.uses
            ):
                problems.append(
                    f"stage {home.number} reads a {node.args[0].id} section its `uses` does not declare: "
                    f"{module_path(module)}:{node.lineno}"
                )
    return problems


def violations(root: Path = REPO) -> list[str]:
    modules = our_modules(root)
    edges = import_edges(modules)
    homes = stage_homes(modules)
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
        if src == "pipeline" and dst in ("stages", "standins", "evalkit"):
            problems.append(f"the engine imports the {dst} package: {e}")
        if src in ("stages", "evalkit") and dst == "standins":
            problems.append(f"production code imports the stand-ins: {e}")
        if src == "stages":
            internal = [m for m in ENGINE_INTERNALS if e.target == m or e.target.startswith(f"{m}.")]
            if internal:
                problems.append(f"stage code imports an engine internal: {e}")
            mine = next((h for h in homes if h.holds(e.source)), None)
            theirs = next((h for h in homes if h.holds(e.target)), None)
            private = [n for n in e.names if n.startswith("_")]
            if private and (mine is None or theirs is None or mine.home != theirs.home):
                problems.append(f"stage code imports private names of another package: {e}")
            if dst == "stages" and e.source not in ROOT and theirs is not None and e.target not in ROOT:
                if mine is None:
                    problems.append(f"a module the stages share imports stage {theirs.number}: {e}")
                elif theirs.number > mine.number:
                    problems.append(f"stage {mine.number} imports a later stage ({theirs.number}): {e}")
    problems += config_problems(modules, homes)
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


# -- the rules fail where they should: a small tree of our packages, one problem at a time ----------
TREE = {
    "pipeline/__init__.py": "",
    "pipeline/stage.py": "class ItemStage:\n    uses = ()\n",
    "stages/__init__.py": (
        'STAGES: list[str] = ["stages.first:FirstStage", "stages.second.stage:SecondStage"]\n'
    ),
    "stages/tools.py": "",
    "stages/first.py": (
        'class FirstConfig:\n    pass\n\n\nclass FirstStage:\n    number = 1\n    name = "first"\n'
    ),
    "stages/second/__init__.py": "",
    "stages/second/stage.py": (
        "from stages.first import FirstConfig\n\n\n"
        'class SecondStage:\n    number = 2\n    name = "second"\n    uses = (FirstConfig,)\n\n'
        "    def f(self):\n        return self.section(FirstConfig), self.cfg\n"
    ),
}


@pytest.mark.parametrize(
    ("path", "code", "says"),
    [
        (None, "", None),  # the tree as it is: no problem
        ("stages/first.py", "import stages.second.stage\n", "import cycle among"),
        (
            "pipeline/io.py",
            "def f():\n    from stages.first import FirstStage\n",
            "the engine imports the stages",
        ),
        (
            "stages/first.py",
            "def f():\n    from stages.second.stage import SecondStage\n",
            "stage 1 imports a later",
        ),
        (
            "stages/tools.py",
            "from stages.first import FirstConfig\n",
            "a module the stages share imports stage 1",
        ),
        (
            "stages/second/stage.py",
            "def g(self):\n    return self.config.first.x\n",
            "reads config section 'first'",
        ),
        (
            "stages/first.py",
            "def g(self):\n    return self.section(SecondConfig)\n",
            "its `uses` does not declare",
        ),
        ("stages/second/stage.py", "def g(self):\n    return self.config.second.x\n", None),  # its own
    ],
)
def test_the_rules_fail_on_what_they_forbid(
    tmp_path: Path, path: str | None, code: str, says: str | None
) -> None:
    for rel, text in TREE.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text + (code if rel == path else ""))
    if path is not None and path not in TREE:
        (tmp_path / path).write_text(code)
    problems = violations(tmp_path)
    if says is None:
        assert problems == []
    else:
        assert any(says in p for p in problems), problems
