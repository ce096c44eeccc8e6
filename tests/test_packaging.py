"""The one ``rlfleet`` namespace: every package folder is installed under it, nothing else is."""

from __future__ import annotations

import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE_FOLDERS = sorted(init.parent.name for init in REPO.glob("*/__init__.py"))
"""Every top-level folder that is a package (job, learner, trainers, ...; tests and bench are
not)."""


def declared_packages() -> list[str]:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return pyproject["tool"]["setuptools"]["packages"]


def package_dirs() -> list[str]:
    """``rlfleet`` plus ``rlfleet.<dotted folder>`` for every folder holding an __init__.py."""
    found = ["rlfleet"]
    for top in PACKAGE_FOLDERS:
        for init in sorted((REPO / top).rglob("__init__.py")):
            found.append("rlfleet." + ".".join(init.parent.relative_to(REPO).parts))
    return found


def test_pyproject_lists_every_package_folder() -> None:
    assert {"job", "learner", "trainers", "checkpoint", "algorithms", "tasks"} <= set(
        PACKAGE_FOLDERS
    )
    assert sorted(declared_packages()) == sorted(package_dirs())


def test_the_wheel_installs_everything_under_rlfleet_only(tmp_path: Path) -> None:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        cwd=tmp_path,
        capture_output=True,
        timeout=300,
    )
    [wheel] = tmp_path.glob("rlfleet-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.startswith("rlfleet-")}
    assert top_level == {"rlfleet"}
    modules = {name for name in names if name.endswith(".py")}
    for package in package_dirs():
        assert package.replace(".", "/") + "/__init__.py" in modules, package
    assert "rlfleet/job/train.py" in modules
    assert "rlfleet/core.py" in modules
    assert "rlfleet/cli.py" in modules
