"""bench/side_by_side.py: the rounds that alternate the sides of a side-by-side benchmark, and
the timed-steps loop (what bench/ppo_step.py, grpo_step.py and learner_ranks.py share)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def side_by_side(monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import side_by_side

    return side_by_side


def test_the_sides_alternate_each_round_and_every_run_is_printed(
    side_by_side: Any, capsys: pytest.CaptureFixture
) -> None:
    runs: list[str] = []

    def run(impl: str) -> dict[str, Any]:
        runs.append(impl)
        return {"step_s": float(len(runs))}

    results = side_by_side.alternate(
        {"rlfleet": "ours", "trl": "theirs"},
        3,
        run,
        lambda r, impl, result: f"{r} {impl} {result['step_s']:g}",
    )

    assert runs == ["rlfleet", "trl", "trl", "rlfleet", "rlfleet", "trl"]
    assert results == {
        "rlfleet": [{"step_s": 1.0}, {"step_s": 4.0}, {"step_s": 5.0}],
        "trl": [{"step_s": 2.0}, {"step_s": 3.0}, {"step_s": 6.0}],
    }
    assert capsys.readouterr().out.splitlines() == [
        "0 rlfleet 1",
        "0 trl 2",
        "1 trl 3",
        "1 rlfleet 4",
        "2 rlfleet 5",
        "2 trl 6",
    ]
    ours, theirs = results["rlfleet"], results["trl"]
    assert side_by_side.median_ratio(ours, theirs, "step_s") == pytest.approx(
        5 / 6
    )  # of 1/2, 4/3, 5/6
    doubled = side_by_side.median_ratio(ours, theirs, lambda r: r["step_s"] * 2)
    assert doubled == pytest.approx(5 / 6)


def test_timed_steps_warm_up_on_batch_0_and_time_the_next_ones(side_by_side: Any) -> None:
    events: list[str] = []
    figures = side_by_side.timed_steps(
        lambda batch: events.append(f"step {batch}"),
        lambda index: events.append(f"batch {index}") or index,
        2,
        before_each=lambda: events.append("before"),
    )
    assert events == [
        "batch 0",
        "step 0",
        "batch 1",
        "before",
        "step 1",
        "batch 2",
        "before",
        "step 2",
    ]
    assert sorted(figures) == ["step_cpu_s", "step_peak_mib", "step_s"]
    assert all(len(values) == 2 for values in figures.values())
    assert all(seconds >= 0 for seconds in figures["step_s"] + figures["step_cpu_s"])


def test_peak_rss_sees_memory_the_block_allocates(side_by_side: Any) -> None:
    with side_by_side.PeakRss() as rss:
        block = bytearray(64 * side_by_side.MIB)
        block[:: side_by_side.PAGE_BYTES] = b"x" * len(block[:: side_by_side.PAGE_BYTES])
    assert rss.peak - rss.start >= 32 * side_by_side.MIB
    del block
