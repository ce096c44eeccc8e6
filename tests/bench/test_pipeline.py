"""bench/pipeline.py: the rlfleet sides' jobs (sync and async, disaggregated with a core each),
iterations timed between learner steps, the figures and ratios it reports, and (slow) a run of
every side end to end with tiny sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from rlfleet.bench import pipeline

ROOT = Path(__file__).resolve().parents[2]


def bench_args(*argv: str) -> Any:
    args = pipeline.parse_args(list(argv))
    args.model_dir, args.prompts = Path("/model"), Path("/prompts.jsonl")
    return args


def test_the_async_side_runs_the_sync_job_in_async_mode_on_cores_of_their_own() -> None:
    args = bench_args("--lag", "2", "--iterations", "4")
    sync = pipeline.rlfleet_config(args, Path("/work"), "sync")
    async_ = pipeline.rlfleet_config(args, Path("/work"), "async")

    assert (sync.mode, sync.max_policy_lag) == ("sync", 0)
    assert (async_.mode, async_.max_policy_lag) == ("async", 2)
    for config in (sync, async_):
        assert config.placement == "disaggregated"
        assert config.generators.num_cpus == config.learner.num_cpus == 1
        assert config.reward.num_cpus == 0
        assert config.iterations == 4 and config.samples_per_iteration == 64
    assert sync.model_dump(exclude={"mode", "max_policy_lag"}) == async_.model_dump(
        exclude={"mode", "max_policy_lag"}
    )
    assert pipeline.side_threads("rlfleet-async", args) == 1
    assert pipeline.side_threads("trl", args) == 2  # the whole rlfleet job's


def test_colocated_keeps_the_job_defaults_and_set_overrides_win() -> None:
    args = bench_args("--placement", "colocated", "--set", "generators.kv_cache_gib=0.5")
    config = pipeline.rlfleet_config(args, Path("/work"), "async")
    assert config.placement == "colocated" and config.learner.num_cpus is None
    assert config.generators.kv_cache_gib == 0.5


def test_an_iteration_runs_from_one_learner_steps_scoring_to_the_next() -> None:
    # Async: batches 0 and 1 go out at 0.0; the rollouts of iteration k reach the reward actors
    # at ``steps[k]``; the job ends at 9.0.
    seconds = pipeline.iteration_seconds(0.0, {0: 1.0, 1: 3.0, 2: 5.5}, 9.0)
    assert seconds == [3.0, 2.5, 3.5]
    assert sum(seconds) == 9.0


def result(iterations: list[float], wall: float, **parts: list[float]) -> dict[str, Any]:
    return {
        "iteration_s": iterations,
        "startup_s": 10.0,
        "wall_s": wall,
        "parts_s": parts or {"generate": iterations},
        "settings": {},
    }


def test_figures_give_each_sides_pace_and_the_ratios_against_their_targets() -> None:
    results = {
        "rlfleet": [result([5.0, 2.0, 2.0], 40.0, generate=[1, 0.5, 0.5], train=[1, 1.5, 1.5])],
        "rlfleet-async": [result([5.0, 1.0, 1.0], 30.0)],
        "trl": [result([9.0, 4.0, 4.0], 60.0)],
    }
    report = pipeline.figures(results, (0.5, 0.4, 0.3), 3)

    (async_,) = report["sides"]["rlfleet-async"]
    assert async_["samples_per_s"] == 64.0 and async_["iteration_s"] == 1.0
    assert (async_["first_s"], async_["startup_s"], async_["wall_s"]) == (5.0, 10.0, 30.0)
    ratios = report["ratios"]
    assert ratios["async/sync samples/s"] == {"value": 2.0, "target": "target >= 1.5: met"}
    assert ratios["async/TRL iteration"] == {"value": 0.25, "target": "target <= 0.7: met"}
    assert ratios["async/TRL whole wall"] == {"value": 0.5, "target": "target <= 1.0: met"}
    assert ratios["sync/TRL iteration"] == {"value": 0.5, "target": ""}
    assert report["sync_overlap_bound"] == pytest.approx(2.0 / 1.5)
    assert report["load_average"]["start"] == [0.5, 0.4, 0.3]


def test_ratios_skip_the_sides_that_did_not_run_and_name_a_missed_target() -> None:
    results = {"rlfleet": [result([1.0, 1.0], 9.0)], "rlfleet-async": [result([1.0, 0.9], 9.0)]}
    rows = pipeline.ratios(results)
    assert [(name, reading) for name, _, reading in rows] == [
        ("async/sync samples/s", "target >= 1.5: MISSED")
    ]
    with pytest.raises(SystemExit):
        pipeline.parse_args(["--sides", "rlfleet,verl"])


@pytest.mark.slow
def test_smoke_run_reports_every_side(tmp_path: Path) -> None:
    sides = "rlfleet,rlfleet-async" + (",trl" if pipeline.VENVS["trl"].exists() else "")
    report_path = tmp_path / "pipeline.json"
    command = [sys.executable, "bench/pipeline.py", "--iterations", "2", "--sides", sides]
    command += ["--report", str(report_path)]
    env = dict(os.environ)
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(report_path.read_text())

    assert list(report["sides"]) == sides.split(",")
    for impl, (figures,) in report["sides"].items():
        assert figures["samples_per_s"] > 0 and 0 < figures["startup_s"] < figures["wall_s"], impl
    (async_,) = report["sides"]["rlfleet-async"]
    assert async_["settings"]["mode"] == "async" and async_["settings"]["max_policy_lag"] == 1
    assert async_["settings"]["OMP_NUM_THREADS"] == "1"
    assert "async/sync samples/s" in report["ratios"]
    assert "async/sync samples/s:" in run.stdout
