"""DAPO's dynamic sampling and overlong penalty in a real job (local Ray, vLLM generators, reward
actors, the learner): groups whose samples scored alike are dropped and refilled from new
prompts; every id is trained once or recorded as dropped, never both, never twice."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from support.job_configs import read_stats, small_job

from rlfleet.job.loop import TrainingJob


@pytest.fixture(autouse=True)
def short_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))


@pytest.mark.slow
def test_dynamic_sampling_trains_only_groups_that_differ_and_accounts_for_every_id(
    ray_local, tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = small_job(
        tiny_model_dir,
        tmp_path / "run",
        algorithm="grpo",
        generators={"n_samples_per_prompt": 2, "max_new_tokens": 8},
        critic_free={"batch_size": 8},
        reward={"function": "support.rewards:word_parity"},
        dynamic_sampling={"max_rounds": 20},
        overlong_penalty={"buffer_len": 4, "penalty_factor": 0.5},
        iterations=3,
    )
    job = TrainingJob(config)
    trained, dispatched = [], []
    score, dispatch = job.score, job.dispatch_next_batch
    job.score = lambda rollouts: trained.append(score(rollouts)) or trained[-1]
    job.dispatch_next_batch = lambda *a: dispatched.append(dispatch(*a)) or dispatched[-1]
    try:
        result = job.train()
    finally:
        job.shutdown()

    stats = read_stats(tmp_path / "run")
    dropped = [i for line in stats for i in line["dynamic_sampling/dropped_rollout_ids"]]
    consumed = result.consumed_rollout_ids
    produced = [i for batch in dispatched for i in batch.batch.column("rollout_id").to_pylist()]
    assert len(consumed) == len(set(consumed)) == 3 * 8
    assert not set(consumed) & set(dropped)
    assert sorted(consumed + dropped) == sorted(produced)  # each id trained or dropped, once
    assert sum(line["dynamic_sampling/rounds"] for line in stats) > 3  # some refilled
    by_id = {row["rollout_id"]: row for batch in trained for row in batch.to_pylist()}
    for rid in consumed:
        group = [r["score"] for r in by_id.values() if r["group_id"] == by_id[rid]["group_id"]]
        assert np.std(group) > 0  # a trained group's samples scored differently
    for row in by_id.values():  # the penalty: 8 tokens of a budget of 8, buffer 4
        length, parity = len(row["response_ids"]), len(row["response"].split()) % 2
        penalty = min(-(length - 4) / 4 * 0.5, 0.0)
        assert row["score"] == pytest.approx(parity + penalty, abs=1e-6)
