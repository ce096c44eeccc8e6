"""Dependencies flow one way (docs/architecture.md):

    job -> learner -> checkpoint -> trainers -> algorithms

``actors``, ``envs`` and ``reward`` sit beside ``learner`` and import none of learner, trainers,
checkpoint or job (``envs``, the environment protocol and actors, imports only ``common``; the
generators' rollout loop in ``actors`` calls environment actors); ``tasks`` (the demos' tiny
models and toy tasks) imports only ``common`` and the environment protocol; every package may
use ``common``, which imports no other; nothing imports the command line (``cli.py``). And no two
modules import each other, directly or through others.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = (
    "common",
    "tasks",
    "algorithms",
    "trainers",
    "checkpoint",
    "learner",
    "envs",
    "actors",
    "reward",
    "job",
)
MAY_IMPORT = {
    "common": set(),
    "tasks": {"common", "envs"},
    "algorithms": {"common"},
    "trainers": {"common", "algorithms"},
    "checkpoint": {"common", "algorithms", "trainers"},
    "learner": {"common", "algorithms", "trainers", "checkpoint"},
    "envs": {"common"},
    "actors": {"common", "algorithms", "envs"},
    "reward": {"common", "algorithms"},
    "job": {
        "common",
        "tasks",
        "algorithms",
        "trainers",
        "checkpoint",
        "learner",
        "actors",
        "envs",
        "reward",
    },
}
"""Which other packages each package may import (itself always)."""


def imported_modules(path: Path) -> set[str]:
    """Every ``rlfleet.…`` module that ``path`` imports, at any depth of the file (an import
    inside a function is still a dependency), as dotted names without the ``rlfleet.``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name.removeprefix("rlfleet.") for name in found if name.startswith("rlfleet.")}


ROOT = "rlfleet (the public API)"
"""What an import of a name from ``rlfleet`` itself counts as: the users' facade, which a
package never goes through (it would hide which layer it reaches)."""


def rlfleet_imports(path: Path) -> set[str]:
    """The first package under ``rlfleet.`` of every import in ``path`` (``ROOT`` for a name
    imported from the root package)."""
    first = {name.split(".")[0] for name in imported_modules(path)}
    return {part if part in (*PACKAGES, "cli", "core") else ROOT for part in first}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> list[Path]:
    files = [REPO / "cli.py", REPO / "core.py"]
    for package in PACKAGES:
        files.extend(sorted((REPO / package).rglob("*.py")))
    return files


@pytest.mark.parametrize("package", PACKAGES)
def test_a_package_imports_only_the_layers_below_it(package: str) -> None:
    allowed = MAY_IMPORT[package] | {package}
    offending = {
        str(path.relative_to(REPO)): sorted(rlfleet_imports(path) - allowed)
        for path in sorted((REPO / package).rglob("*.py"))
    }
    assert {path: found for path, found in offending.items() if found} == {}


def test_nothing_imports_the_command_line() -> None:
    users = [str(p.relative_to(REPO)) for p in source_files() if "cli" in rlfleet_imports(p)]
    assert users == []


def import_graph() -> dict[str, set[str]]:
    """Module -> the rlfleet modules it imports (a ``from package import module`` counts as the
    module; names that are not modules are dropped)."""
    modules = {module_name(path): path for path in source_files()}
    graph = {}
    for name, path in modules.items():
        targets = {target for target in imported_modules(path) if target in modules}
        graph[name] = targets - {name} - {t for t in targets if name.startswith(t + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle() -> None:
    assert cycles(import_graph()) == []


def test_the_checks_see_imports_and_cycles(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "import rlfleet.trainers.ppo\nfrom rlfleet.actors import engine\n"
        "def f():\n    from rlfleet.job import loop\n    from rlfleet import PPOTrainer\n"
    )
    assert rlfleet_imports(module) == {"trainers", "actors", "job", ROOT}
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
