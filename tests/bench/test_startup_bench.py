"""bench/startup.py's bookkeeping (the runs themselves are the demo job: not run here)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def startup(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import startup

    return startup


def test_worker_ids_are_dropped_and_a_repeated_milestone_is_numbered(startup: Any) -> None:
    trace = [
        (1.0, 10, -1.0, "LearnerActor.__init__ began (worker 3f2a)"),
        (1.5, 10, -1.0, "LearnerActor.__init__ began (worker 9c01)"),
        (2.0, 11, 0.4, "checks done"),
    ]
    assert startup.milestone_names(trace) == [
        (1.0, -1.0, "LearnerActor.__init__ began"),
        (1.5, -1.0, "LearnerActor.__init__ began #2"),
        (2.0, 0.4, "checks done"),
    ]


def test_a_variant_is_a_name_and_its_environment(startup: Any) -> None:
    assert startup.parse_variant("base:PYTHONPATH=/a,RAY_x=1") == (
        "base",
        {"PYTHONPATH": "/a", "RAY_x": "1"},
    )
    assert startup.parse_variant("plain") == ("plain", {})


def test_the_cpu_of_a_process_tree_is_sampled_by_kind(startup: Any) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; sum(range(10**7)); time.sleep(30)"]
    )
    try:
        sampler = startup.CpuSampler(os.getpid())  # this process counts as the driver
        for _ in range(100):  # until the child has spent some CPU
            sampler.sample()
            if sampler.seen.get(child.pid, ("", 0.0))[1] > 0.05:
                break
            time.sleep(0.1)
        assert sampler.seen[child.pid][1] > 0.05
        assert sampler.by_label()["driver (rlfleet train)"] > 0
    finally:
        child.kill()
        child.wait()
