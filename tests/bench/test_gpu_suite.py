"""The GPU suite (bench/gpu_suite.sh) must run unchanged the day a GPU machine is lent: its
``--smoke`` mode runs the same code on the CPU, with a tiny model and two gloo learner ranks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_smoke_run_reports_every_figure(tmp_path: Path) -> None:
    figures = tmp_path / "figures.json"
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(
        ["bash", "bench/gpu_suite.sh", "--smoke", "--json", str(figures)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(figures.read_text())
    learners = {entry["ranks"]: entry for entry in results["learner"]}
    assert sorted(learners) == [1, 2]
    assert learners[1]["params"] == learners[2]["params"] > 0
    for entry in learners.values():
        assert entry["tokens_per_s"] > 0 and entry["model_tflops_per_s"] > 0
        assert entry["full_state_gb"] * 1e9 >= 2 * entry["params"]  # every tensor, >= bf16
    assert results["generation"]["tokens_per_s"] > 0
    for path in ("through_host", "device_to_device"):
        assert results["weight_sync_local"][path]["gb_per_s"] > 0
    assert "learner 2 rank(s)" in result.stdout
