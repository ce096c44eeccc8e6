"""bench/agent_endpoint.py runs end to end with --quick: both sides (the native multi-turn loop
and the openai agent through the endpoint) play their games, and the report has every figure
the benchmark's reading needs. The model is pretrained by the run (as where artifacts/ is
absent), so the test does the same wherever it runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

FIGURES = ["tokens_per_s", "trajectories_per_s", "mean_turns"]


@pytest.mark.slow
def test_quick_run_reports_every_figure(tmp_path: Path) -> None:
    report_path = tmp_path / "agent_endpoint.json"
    command = [sys.executable, "bench/agent_endpoint.py", "--quick", "--json", str(report_path)]
    command += ["--model", str(tmp_path / "absent-model")]
    result = subprocess.run(
        command, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(report_path.read_text())

    assert report["workload"]["model"] == "pretrained here, 40 steps"
    assert report["workload"]["trajectories"] == 8 and report["workload"]["rounds"] == 1
    assert list(report["sides"]) == ["native", "endpoint"]
    for name, side in report["sides"].items():
        for figure in FIGURES:
            assert side[figure] > 0, (name, figure)
        (only_round,) = side["rounds"]
        assert only_round["tokens"] > 0 and only_round["wall_s"] > 0, name
        assert only_round["dropped"] < 8, name
        assert only_round["cpu_s"]["generator"] > 0, name
        assert only_round["cpu_s"]["env_actors"] >= 0, name
    assert set(report["ratios"]) == {
        "endpoint/native tokens_per_s",
        "endpoint/native trajectories_per_s",
    }
    assert all(value > 0 for value in report["ratios"].values())
    assert report["target"] == {"ratio": "endpoint/native tokens_per_s", "at_least": 0.7}
    assert isinstance(report["target_met"], bool)
    assert report["nproc"] >= 1 and "CPUs" in report["machine"]
    assert len(report["load_average"]["start"]) == len(report["load_average"]["end"]) == 3
    assert "secret" in report["workload"]["secrets"]
    assert "target endpoint/native tokens_per_s >= 0.7" in result.stdout
