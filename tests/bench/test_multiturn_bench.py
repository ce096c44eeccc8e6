"""bench/multiturn.py runs end to end with tiny sizes: every mode (rlfleet's loop and the
turn-synchronous one, with and without sleeping environments) samples every turn, and the
report has the figures the benchmark's reading needs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

MODES = ["async_0ms", "async_20ms", "sync_20ms", "async_varied", "sync_varied"]


@pytest.mark.slow
def test_smoke_run_reports_every_mode(tmp_path: Path) -> None:
    report_path = tmp_path / "multiturn.json"
    command = [sys.executable, "bench/multiturn.py", "--trajectories", "4", "--tokens", "4"]
    command += ["--rounds", "1", "--layers", "1", "--width", "64", "--sleep-ms", "20"]
    command += ["--spread-ms", "10", "--json", str(report_path)]
    result = subprocess.run(
        command, cwd=ROOT, env=dict(os.environ), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(report_path.read_text())

    assert list(report["modes"]) == MODES
    for name, mode in report["modes"].items():
        (only_round,) = mode["rounds"]
        assert only_round["tokens"] > 0 and mode["tokens_per_s"] > 0, name
        assert 0 < only_round["engine_s"] <= only_round["wall_s"], name
    assert report["modes"]["sync_varied"]["sleep_ms"] == [10.0, 30.0]
    assert set(report["ratios"]) == {
        "async_20ms/async_0ms",
        "async_20ms/sync_20ms",
        "async_varied/async_0ms",
        "async_varied/sync_varied",
        "sync_20ms/async_0ms",
    }
    assert report["target"] == {"ratio": "async_20ms/async_0ms", "at_least": 0.8}
    assert isinstance(report["target_met"], bool)
    assert report["nproc"] >= 1 and len(report["load_average"]["start"]) == 3
    assert report["threads"]["OMP_WAIT_POLICY"] == "PASSIVE"
    assert "target async_20ms/async_0ms >= 0.8" in result.stdout
