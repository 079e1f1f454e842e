"""The layering rules of docs/architecture.md, checked on the source (ast) and at import time.

Static rules read every ``import`` statement of the tree, including the ones inside
functions (a lazy import is still a dependency). Import-time rules start a fresh
interpreter and look at ``sys.modules``, which also catches what a string passed to
``importlib`` would pull in.
"""

from __future__ import annotations

import ast
import itertools
import json
import subprocess
import sys
from collections.abc import Callable, Collection
from pathlib import Path

import pytest

from kvstore.cli import EXTERNAL_COMMANDS

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("kvstore", "transfer", "workers", "bench", "tests")

#: The shared core: what both the server and the client may import.
CORE = ("kvstore", "kvstore.errors", "kvstore.retry", "kvstore.keys", "kvstore.integrity", "kvstore.wire")
CORE_PACKAGES = ("kvstore.v1",)  # generated stubs

#: The harnesses shared by tests and benchmarks, one per side: the server's (processes, raw-gRPC
#: workloads) and the client's (workloads that drive the client, standing on the server's). No
#: exemption for either below: kvstore/ (its CLI and harness included) never imports transfer/.
HARNESSES = ("kvstore.testing", "transfer.testing")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module an ``import`` statement in ``path`` names (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                stem = ".".join([*base, node.module] if node.module else base)
            else:
                stem = node.module or ""
            found.add(stem)
            # ``from kvstore import integrity`` imports the module kvstore.integrity.
            found.update(f"{stem}.{alias.name}" for alias in node.names if alias.name != "*")
    return found


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _project_imports() -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "_pb2" in path.name:
                continue
            out[module_name(path)] = {
                name for name in imports_of(path) if name.split(".")[0] in (*PACKAGES, "torch", "ray")
            }
    return out


IMPORTS = _project_imports()


def _is_core(name: str) -> bool:
    return name in CORE or any(_within(name, p) for p in CORE_PACKAGES)


def _is_project_module(name: str) -> bool:
    """``from kvstore import integrity`` names a module; ``from kvstore.keys import Namespace`` does not."""
    return name in IMPORTS


def violations(rule: str, modules: list[str], bad: Callable[[str], bool]) -> list[str]:
    return [f"{m} imports {name} ({rule})" for m in modules for name in sorted(IMPORTS[m]) if bad(name)]


def test_the_tree_was_read() -> None:
    # A rule over an empty set of modules would pass whatever the code does.
    assert {
        "kvstore.server",
        "kvstore.errors",
        "transfer.rpc.client",
        "workers.demo",
        "bench.reliability",
    } <= set(IMPORTS)
    assert "kvstore.errors" in IMPORTS["kvstore.backends.tiered"]
    assert "kvstore.retry" in IMPORTS["transfer.rpc.core"]


def test_the_shared_core_imports_only_the_shared_core() -> None:
    core = [m for m in IMPORTS if _is_core(m)]
    assert "kvstore.errors" in core and "kvstore.retry" in core
    found = violations(
        "the shared core stands alone", core, lambda n: _is_project_module(n) and not _is_core(n)
    ) + violations("no torch or ray in the core", core, lambda n: n.split(".")[0] in ("torch", "ray"))
    assert not found, "\n".join(found)


def test_the_client_imports_only_the_shared_core_of_kvstore() -> None:
    client = [m for m in IMPORTS if _within(m, "transfer") and not _within(m, "transfer.testing")]
    found = violations(
        "the client reaches kvstore only through the shared core",
        client,
        lambda n: n.split(".")[0] == "kvstore" and _is_project_module(n) and not _is_core(n),
    )
    found += violations(
        "the client never imports the server's internals",
        client,
        lambda n: (
            _within(n, "kvstore.backends") or _within(n, "kvstore.server") or _within(n, "kvstore.service")
        ),
    )
    found += violations(
        "the client is below workers, bench and tests",
        client,
        lambda n: n.split(".")[0] in ("workers", "bench", "tests"),
    )
    assert not found, "\n".join(found)


def test_the_server_never_imports_the_client_workers_or_ml() -> None:
    # Every module of kvstore/, the ``kvstore`` command and the test harness included: the
    # commands implemented elsewhere are loaded through EXTERNAL_COMMANDS, by module path.
    kvstore = [m for m in IMPORTS if _within(m, "kvstore")]
    assert {"kvstore.cli", "kvstore.testing.store", "kvstore.testing.reliability.fuzz"} <= set(kvstore)
    found = violations(
        "kvstore is below the client",
        kvstore,
        lambda n: n.split(".")[0] in ("transfer", "workers", "bench", "tests", "torch", "ray"),
    )
    below = [m for h in HARNESSES for m in IMPORTS if _within(m, h.split(".")[0]) and not _within(m, h)]
    found += violations(
        "nothing below a harness imports it", below, lambda n: any(_within(n, h) for h in HARNESSES)
    )
    assert not found, "\n".join(found)


def test_the_client_harness_drives_a_server_from_outside() -> None:
    harness = [m for m in IMPORTS if _within(m, "transfer.testing")]
    assert "transfer.testing.load" in harness
    found = violations(
        "the client's harness uses the client and kvstore.testing, never the server's internals",
        harness,
        lambda n: (
            _within(n, "kvstore.backends")
            or _within(n, "kvstore.server")
            or _within(n, "kvstore.service")
            or n.split(".")[0] in ("workers", "bench", "tests", "torch", "ray")
        ),
    )
    assert not found, "\n".join(found)


def test_nothing_imports_bench_and_only_tests_import_tests() -> None:
    everything = list(IMPORTS)
    found = violations("bench/ is a leaf", everything, lambda n: n.split(".")[0] == "bench")
    found += violations(
        "only tests import tests",
        [m for m in everything if not _within(m, "tests")],
        lambda n: n.split(".")[0] == "tests",
    )
    assert not found, "\n".join(found)


def test_external_commands_live_outside_kvstore() -> None:
    assert EXTERNAL_COMMANDS, "the CLI names no external command: the demo is gone?"
    for name, command in EXTERNAL_COMMANDS.items():
        assert not _within(command.module, "kvstore"), f"{name}: {command.module} belongs outside kvstore/"
        assert command.module in IMPORTS, f"{name}: no module {command.module} in the tree"
        assert f"def {command.function}(" in (ROOT / (command.module.replace(".", "/") + ".py")).read_text()


def _loaded_after(statement: str) -> list[str]:
    code = (
        f"import json, sys; {statement}; "
        "print(json.dumps(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('torch', 'ray', 'workers', 'transfer', 'bench', 'tests') "
        "or m.startswith('kvstore.backends') or m in ('kvstore.server', 'kvstore.service'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    ("statement", "allowed_prefixes"),
    [
        # The CLI module: no workers, Ray, torch, client or server at import time.
        ("import kvstore.cli; kvstore.cli.build_parser()", ()),
        # The server's harness: servers and raw-gRPC workloads, never the client, workers, Ray or torch.
        (
            "import kvstore.testing.store, kvstore.testing.reliability",
            ("kvstore.backends", "kvstore.server", "kvstore.service"),
        ),
        # ``kvstore stats``: a client, with no server module.
        ("import transfer.cli, transfer.replicas.stats", ("transfer",)),
        # The server: its backends, never the client, workers, Ray or torch.
        ("import kvstore.server", ("kvstore.backends", "kvstore.server", "kvstore.service")),
        # The client and the cluster client: never the server's backends or workers.
        ("import transfer.rpc.client, transfer.replicas.client, transfer.rpc.aio_client", ("transfer",)),
    ],
)
def test_import_time_dependencies(statement: str, allowed_prefixes: tuple[str, ...]) -> None:
    loaded = _loaded_after(statement)
    unexpected = [m for m in loaded if not any(_within(m, p) for p in allowed_prefixes)]
    assert not unexpected, f"{statement!r} loaded {unexpected}"


# ---------------------------------------------------------------- no import circle
#
# A circle (a imports b, b imports a, at module level or lazily inside a function) means neither
# module can be read, tested or moved without the other, and a module-level one fails at import
# time depending on which side loads first. The graph is of what runs: ``from pkg import mod``
# is an edge to ``pkg.mod`` (the package is the importer's parent, already loading), and imports
# under ``if TYPE_CHECKING:`` never run, so they are how annotations may point back up.


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve(name: str, modules: Collection[str]) -> str | None:
    """The project module ``name`` is or lies in (``kvstore.keys.Namespace`` -> ``kvstore.keys``)."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def runtime_imports(source: str, module: str, is_package: bool, modules: Collection[str]) -> dict[str, int]:
    """The project modules ``module`` imports when it runs (module level or lazily), each with the
    line of its first such import; ``if TYPE_CHECKING:`` blocks are skipped."""
    package = module if is_package else module.rpartition(".")[0]
    found: dict[str, int] = {}
    stack: list[ast.AST] = [ast.parse(source)]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.Import):
            targets = [_resolve(alias.name, modules) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            stem = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                stem = ".".join([*base, node.module] if node.module else base)
            # ``from pkg import mod`` imports the module pkg.mod; ``from mod import name``, mod.
            targets = [
                f"{stem}.{alias.name}" if f"{stem}.{alias.name}" in modules else _resolve(stem, modules)
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            if target is not None and target != module:
                found[target] = min(found.get(target, node.lineno), node.lineno)
    return found


def import_cycles(graph: dict[str, dict[str, int]]) -> list[str]:
    """One circle per strongly connected component of ``graph`` (Tarjan), as ``a (line n) -> b -> a``:
    the shortest circle through the component's first module, with the line of each import."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph.get(v, {})):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    cycles = []
    for component in sorted(components):
        start, members = component[0], set(component)
        came_from: dict[str, str] = {}
        frontier = [start]
        while start not in came_from:  # breadth first: the shortest way back to ``start``
            reached = []
            for v in frontier:
                for w in sorted(graph[v]):
                    if w in members and w not in came_from:
                        came_from[w] = v
                        reached.append(w)
            frontier = reached
        path = [start]
        while len(path) == 1 or path[-1] != start:
            path.append(came_from[path[-1]])
        path.reverse()
        cycles.append(
            " -> ".join(f"{a} (line {graph[a][b]})" for a, b in itertools.pairwise(path)) + f" -> {start}"
        )
    return cycles


def _runtime_graph() -> dict[str, dict[str, int]]:
    graph = {}
    for module in IMPORTS:
        path = ROOT / (module.replace(".", "/") + ".py")
        is_package = not path.exists()
        if is_package:
            path = ROOT / module.replace(".", "/") / "__init__.py"
        graph[module] = runtime_imports(path.read_text(), module, is_package, IMPORTS)
    return graph


def test_the_cycle_finder_reads_lazy_imports_and_reports_a_circle() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "from kvstore import errors\n"
        "from kvstore.keys import Namespace\n"
        "if TYPE_CHECKING:\n"
        "    from kvstore.server import ServerHandle\n"
        "def choose():\n"
        "    from . import redis_cluster\n"
    )
    modules = {
        "kvstore",
        "kvstore.errors",
        "kvstore.keys",
        "kvstore.server",
        "kvstore.backends.redis_cluster",
    }
    assert runtime_imports(source, "kvstore.backends.redis", False, modules) == {
        "kvstore.errors": 2,
        "kvstore.keys": 3,
        "kvstore.backends.redis_cluster": 7,
    }
    graph = {"a": {"b": 1}, "b": {"c": 2, "d": 5}, "c": {"a": 3}, "d": {}, "e": {"a": 4}}
    assert import_cycles(graph) == ["a (line 1) -> b (line 2) -> c (line 3) -> a"]
    assert import_cycles({**graph, "c": {}}) == []


def test_no_import_circle() -> None:
    graph = _runtime_graph()
    # Lazy imports are read: the server builds its tiers inside a function.
    assert "kvstore.backends.memory" in graph["kvstore.server"]
    cycles = import_cycles(graph)
    assert not cycles, "import circles (module (line of its import) -> ...):\n" + "\n".join(cycles)
