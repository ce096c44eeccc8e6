"""Dependencies flow one way: common <- actors, reward <- learner (docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAY_NOT_IMPORT = {
    "common": ("actors", "reward", "learner"),
    "actors": ("reward", "learner"),
    "reward": ("actors", "learner"),
}


def rlfleet_imports(path: Path) -> set[str]:
    """The first package under ``rlfleet.`` of every import in ``path``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "rlfleet" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("package", sorted(MAY_NOT_IMPORT))
def test_a_lower_layer_never_imports_a_higher_one(package: str) -> None:
    offending = {
        str(path.relative_to(REPO)): sorted(rlfleet_imports(path) & set(MAY_NOT_IMPORT[package]))
        for path in sorted((REPO / package).rglob("*.py"))
    }
    assert {path: found for path, found in offending.items() if found} == {}


def test_the_check_sees_imports(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("import rlfleet.trainers.ppo\nfrom rlfleet.actors import engine\n")
    assert rlfleet_imports(module) == {"learner", "actors"}
