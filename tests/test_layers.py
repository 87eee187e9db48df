"""The layer rule of docs/architecture.md, checked on the code's imports (parsed with ``ast``, nothing imported).

The table under "## Layers" in docs/architecture.md is the contract: this test reads it, builds the package
import graph of ``pipeline/`` and ``jobs/`` (every ``import``, top-level or inside a function), and fails on
(a) an import of a package from a higher rank (an upward import, e.g. the library importing ``jobs``),
(b) a cycle between packages, (c) a third-party module imported outside the packages the table allows
(``ray`` outside ``pipeline/distributed``, ``mlflow`` outside ``pipeline/tracking.py``). The self-tests at the
end feed synthetic graphs with a cycle and an upward import and check that both are reported.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "architecture.md"
SOURCES = ("pipeline", "jobs")


# ------------------------------------------------------------------------------------------ the documented rule
def parse_rule(markdown: str) -> tuple[dict[str, int], dict[str, set[str]]]:
    """(package -> rank, third-party module -> packages allowed to import it) from the doc's layer table.

    Table rows look like ``| 7 | Ray adapters | `pipeline.distributed` | ... | `ray` |``: the first cell is the
    rank, the third lists packages in backticks, the last (possibly empty) the third-party modules only those
    packages may import (every other package must not import them). ``pipeline`` names the root package's
    ``__init__`` only, never the modules below it.
    """
    section = markdown.split("## Layers", 1)[1].split("\n## ", 1)[0]
    ranks: dict[str, int] = {}
    only: dict[str, set[str]] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 4 or not cells[0].isdigit():
            continue
        packages = re.findall(r"`([\w.]+)`", cells[2])
        for pkg in packages:
            ranks[pkg] = int(cells[0])
        for module in re.findall(r"`([\w.]+)`", cells[-1]):
            only.setdefault(module, set()).update(packages)
    return ranks, only


# ------------------------------------------------------------------------------------------ the code's imports
def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, root: Path) -> list[tuple[str, int]]:
    """(absolute module name, line) of every import in ``path``; ``from pkg import sub`` names ``pkg.sub``
    when ``sub`` is a module or package of this repository."""
    here = module_name(path, root)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                is_module = (root / Path(*sub.split("."))).is_dir() or \
                    (root / Path(*sub.split("."))).with_suffix(".py").is_file()
                out.append((sub if is_module else target, node.lineno))
    return out


def package_of(module: str, ranks: dict[str, int]) -> str | None:
    """The longest table entry that ``module`` is or lies under (None when the table does not name it)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in ranks and (prefix != "pipeline" or module == "pipeline"):  # the root row: __init__ only
            return prefix
    return None


def import_graph(root: Path, ranks: dict[str, int]) -> list[tuple[str, str, str]]:
    """(importing file:line, its package, imported module) for every import in pipeline/ and jobs/."""
    edges = []
    for top in SOURCES:
        for path in sorted((root / top).rglob("*.py")):
            src = package_of(module_name(path, root), ranks)
            if src is None:
                raise AssertionError(f"{path.relative_to(root)} lies in no package of the layer table in "
                                     f"{DOC.relative_to(ROOT)}: add its package to a row")
            for target, line in imported_modules(path, root):
                edges.append((f"{path.relative_to(root)}:{line}", src, target))
    return edges


# ------------------------------------------------------------------------------------------ the check
def cycle_path(graph: dict[str, set[str]], comp: set[str]) -> list[str]:
    """A shortest cycle [a, b, ..., a] through the smallest name of a strongly connected component."""
    start = min(comp)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph.get(v, set()) & comp):
                if w == start:
                    return paths[v] + [start]
                if w not in paths:
                    paths[w] = paths[v] + [w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{sorted(comp)} is not strongly connected")


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Package cycles (each as [a, b, ..., a]), one per strongly connected component of size > 1."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(cycle_path(graph, set(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def violations(edges: list[tuple[str, str, str]], ranks: dict[str, int],
               only: dict[str, set[str]]) -> list[str]:
    """Every break of the rule, one readable line each (empty when the code obeys the table)."""
    problems = []
    graph: dict[str, set[str]] = {}
    for where, src, target in edges:
        top = target.split(".")[0]
        for module, allowed in only.items():
            if (target == module or target.startswith(module + ".")) and src not in allowed:
                problems.append(f"{where}: {src} imports {target}; only {', '.join(sorted(allowed))} may "
                                f"import {module}")
        if top not in SOURCES:
            continue
        dst = package_of(target, ranks)
        if dst is None:
            problems.append(f"{where}: {src} imports {target}, which no row of the layer table names")
            continue
        if dst == src:
            continue
        graph.setdefault(src, set()).add(dst)
        if ranks[dst] > ranks[src]:
            problems.append(f"{where}: upward import: {src} (rank {ranks[src]}) imports {target} "
                            f"({dst}, rank {ranks[dst]}); a package imports only its own rank or lower ones")
    problems = list(dict.fromkeys(problems))  # one line per (place, import), however many names it imports
    for cycle in find_cycles(graph):
        problems.append(f"package cycle: {' -> '.join(cycle)} (break it by moving the shared code down to a "
                        f"kernel)")
    return problems


# ------------------------------------------------------------------------------------------ the tests
def test_code_obeys_the_documented_layers():
    ranks, only = parse_rule(DOC.read_text(encoding="utf-8"))
    assert {"jobs", "pipeline.distributed", "pipeline.tracking", "pipeline.config"} <= set(ranks), \
        "the layer table in docs/architecture.md lost rows"
    assert only.get("ray") == {"pipeline.distributed"} and only.get("mlflow") == {"pipeline.tracking"}
    problems = violations(import_graph(ROOT, ranks), ranks, only)
    assert not problems, "the imports break the layer rule of docs/architecture.md:\n" + "\n".join(problems)


RANKS = {"jobs": 3, "pipeline.distributed": 2, "pipeline.a": 1, "pipeline.b": 1, "pipeline.config": 0}
ONLY = {"ray": {"pipeline.distributed"}}


def test_the_check_reports_an_upward_import_and_a_third_party_import():
    edges = [("pipeline/a/x.py:3", "pipeline.a", "jobs.cli"),
             ("pipeline/a/x.py:4", "pipeline.a", "ray.data"),
             ("pipeline/distributed/y.py:1", "pipeline.distributed", "ray"),
             ("pipeline/a/x.py:5", "pipeline.a", "pipeline.config")]
    problems = violations(edges, RANKS, ONLY)
    assert len(problems) == 2, problems
    assert "pipeline/a/x.py:3: upward import: pipeline.a (rank 1) imports jobs.cli" in problems[0]
    assert "pipeline/a/x.py:4: pipeline.a imports ray.data; only pipeline.distributed may import ray" in \
        problems[1]


def test_the_check_reports_a_cycle_between_packages_of_one_rank():
    edges = [("pipeline/a/x.py:1", "pipeline.a", "pipeline.b.m"),
             ("pipeline/b/m.py:2", "pipeline.b", "pipeline.a.x"),
             ("pipeline/b/m.py:3", "pipeline.b", "pipeline.config")]
    assert violations(edges, RANKS, ONLY) == [
        "package cycle: pipeline.a -> pipeline.b -> pipeline.a (break it by moving the shared code down to a "
        "kernel)"]


def test_the_graph_reads_function_level_relative_and_submodule_imports(tmp_path):
    pkg = tmp_path / "pipeline" / "a"
    pkg.mkdir(parents=True)
    (tmp_path / "pipeline" / "__init__.py").write_text("")
    (tmp_path / "pipeline" / "tracking.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "x.py").write_text("from . import y\ndef f():\n    from pipeline import tracking\n    import ray\n")
    (pkg / "y.py").write_text("")
    assert imported_modules(pkg / "x.py", tmp_path) == [("pipeline.a.y", 1), ("pipeline.tracking", 3),
                                                        ("ray", 4)]


def test_the_rule_is_read_from_the_table():
    doc = ("## Layers\n\n| rank | layer | packages | may import | only here |\n| --- | --- | --- | --- | --- |\n"
           "| 1 | adapters | `pipeline.distributed` | lower ranks | `ray` |\n"
           "| 0 | kernels | `pipeline.config`, `pipeline.data` | each other | |\n\n## Next\n| 5 | x | `y` | |\n")
    assert parse_rule(doc) == ({"pipeline.distributed": 1, "pipeline.config": 0, "pipeline.data": 0},
                               {"ray": {"pipeline.distributed"}})
