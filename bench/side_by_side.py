"""What the side-by-side benchmarks share: the machine they ran on, and running one side (rlfleet
or the peer) of a benchmark script in that side's own virtualenv."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    """CPU count and model, as the closing notes quote them."""
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {model}"


def run_side(python: Path, script: str, impl: str, steps: int) -> dict[str, Any]:
    """Runs ``script --impl impl --json --steps steps`` with ``python``; its last JSON line."""
    command = [str(python), str(Path(script).resolve()), "--impl", impl, "--json"]
    command += ["--steps", str(steps)]
    output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(output.strip().splitlines()[-1])
