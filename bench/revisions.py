"""Times rlfleet's side of a step benchmark in this checkout against another revision's, the
two alternating in one run: a change's speed measured on the same machine at the same load.

    .venv/bin/python bench/revisions.py --base 3acc500 --rounds 3 ppo_step.py
    .venv/bin/python bench/revisions.py --base main~1 grpo_step.py --steps 3

The base revision is exported (``git archive``) into a temporary directory and run with the
same interpreter, ``rlfleet`` resolving to that tree (``PYTHONPATH``); each round runs
``SCRIPT --impl rlfleet --json`` of both trees, the order flipped every round, and the run ends
with the median ratio this checkout / base of the step's wall time, CPU time and peak memory.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from side_by_side import ROOT, alternate, machine, median_ratio, run_side

PYTHON = ROOT / ".venv" / "bin" / "python"
FIGURES = ("median_step_s", "median_step_cpu_s", "median_step_peak_mib")
"""The figures compared, those of them that the script reports (grpo_step.py: no memory)."""


def export_revision(revision: str, directory: Path) -> Path:
    """``revision`` of this repository as a tree at ``directory/rlfleet`` (the root is the
    package, so ``directory`` goes on ``PYTHONPATH``)."""
    tree = directory / "rlfleet"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", revision], check=True, capture_output=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


def figures_of(result: dict[str, Any]) -> list[str]:
    return [name for name in FIGURES if name in result]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("script", help="a step benchmark in bench/ (ppo_step.py, grpo_step.py)")
    parser.add_argument("--base", required=True, help="the git revision to compare against")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="rlfleet-base-") as directory:
        base = export_revision(args.base, Path(directory))
        scripts = {"this": ROOT / "bench" / args.script, "base": base / "bench" / args.script}
        environments = {"this": None, "base": {**os.environ, "PYTHONPATH": directory}}
        print(f"machine: {machine()}; base: {args.base}")
        print(f"{'round':>5} {'tree':>5} " + " ".join(f"{name:>20}" for name in FIGURES))

        def run(side: str) -> dict[str, Any]:
            return run_side(PYTHON, scripts[side], "rlfleet", args.steps, environments[side])

        def row(round_index: int, side: str, result: dict[str, Any]) -> str:
            figures = " ".join(f"{result[name]:>20.3f}" for name in figures_of(result))
            return f"{round_index:>5} {side:>5} {figures}"

        results = alternate(scripts, args.rounds, run, row)
    for name in figures_of(results["this"][0]):
        ratio = median_ratio(results["this"], results["base"], name)
        print(f"median {name} ratio this/base: {ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
