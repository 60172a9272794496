"""The package's shape holds: one package per step of the data flow, each importing only the
steps before it (no circle, type-only imports included), no module over 400 lines, a few
modules at the top, and SQL only in synwatch/store."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from tests.support import REPO

PACKAGE = REPO / "synwatch"
# the data flow's steps, earliest first (../shared/DESIGN.md); a module may import its own step
# and the ones before it
STEPS = (("synwatch", "synwatch.errors", "synwatch.clock", "synwatch.durations"),
         ("synwatch.records", "synwatch.config"), ("synwatch.system",),
         ("synwatch.lines", "synwatch.probes"), ("synwatch.sources", "synwatch.detect"),
         ("synwatch.store",), ("synwatch.charts",), ("synwatch.actions",), ("synwatch.daemon",),
         ("synwatch.cli",),
         ("synwatch.__main__",))
TOP = {"__init__", "__main__", "records", "errors", "clock", "durations"}
MAX_LINES = 400


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        if "migrations" in path.parts:
            continue
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("synwatch"):
                targets = [resolve(f"{node.module}.{a.name}") or resolve(node.module or "")
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [resolve(a.name) for a in node.names if a.name.startswith("synwatch")]
            edges[module].update(t for t in targets if t and t != module)
    return edges


def _step(module: str) -> int:
    for i, names in enumerate(STEPS):
        if any(module == n or (n != "synwatch" and module.startswith(n + ".")) for n in names):
            return i
    raise AssertionError(f"{module} belongs to no step of the data flow")


def test_no_import_circle_and_nothing_imports_a_later_step() -> None:
    edges = _imports(_modules())
    later = sorted(f"{m} -> {t}" for m, ts in edges.items() for t in ts if _step(t) > _step(m))
    assert later == []
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            part = []
            while True:
                w = stack.pop()
                part.append(w)
                if w == v:
                    break
            if len(part) > 1:
                circles.append(sorted(part))

    for v in edges:
        if v not in index:
            visit(v)
    assert circles == []


def test_no_module_is_over_400_lines_and_few_sit_at_the_top() -> None:
    long = {str(p.relative_to(REPO)): n for p in _modules().values()
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
    assert {p.stem for p in PACKAGE.glob("*.py")} == TOP


def test_only_the_store_runs_sql() -> None:
    statement = re.compile(r"""["'](SELECT|INSERT INTO|UPDATE \w+ SET|DELETE FROM) """)
    outside = sorted(str(p.relative_to(REPO)) for p in _modules().values()
                     if "store" not in p.relative_to(PACKAGE).parts[:1]
                     and statement.search(p.read_text()))
    assert outside == []
