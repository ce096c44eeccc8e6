"""A multi-turn job end to end on real local Ray: vLLM generators, 2 environment actors, reward
actors and the learner; trajectories with loss masks reach the learner and its stats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.job_configs import read_stats, small_job


@pytest.fixture(autouse=True)
def vllm_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))


def multiturn_job(model_dir: Path, out: Path, **fields):
    return small_job(
        model_dir,
        out,
        env={
            "environment": "support.envs:CountingEnv",
            "num_actors": 2,
            "num_cpus": 0.25,
            "max_turns": 4,
            "max_total_tokens": 40,
        },
        generators={"max_new_tokens": 6},
        **fields,
    )


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["ppo", "grpo"])
def test_a_multiturn_job_trains_on_masked_trajectories(
    ray_local, tiny_model_dir: Path, tmp_path: Path, algorithm: str
) -> None:
    from rlfleet.job.loop import TrainingJob

    config = multiturn_job(
        tiny_model_dir,
        tmp_path / "run",
        algorithm=algorithm,
        iterations=2,
        logging={"samples_per_iteration": 8},
    )
    job = TrainingJob(config)
    trained = []
    score = job.score
    job.score = lambda rollouts: trained.append(score(rollouts)) or trained[-1]
    try:
        job.train()
    finally:
        job.shutdown()
    rows = [row for batch in trained for row in batch.to_pylist()]
    assert len(rows) == 16 and len({row["rollout_id"] for row in rows}) == 16
    for row in rows:
        mask, ids = row["loss_mask"], row["response_ids"]
        assert len(mask) == len(ids) == len(row["response_logprobs"]) <= 40
        assert row["num_turns"] == len(row["turn_ends"]) == len(row["turn_rewards"]) >= 1
        assert all(mask[end] == 1 for end in row["turn_ends"])
        assert all(
            lp == 0.0 for lp, m in zip(row["response_logprobs"], mask, strict=True) if m == 0
        )
        assert row["finish_reason"] in ("stop", "length", "max_turns")
    assert any(0 in row["loss_mask"] for row in rows)
    stats = read_stats(tmp_path / "run")
    assert len(stats) == 2
    for line, batch in zip(stats, trained, strict=True):  # the score plus the turn rewards
        totals = [r["score"] + sum(r["turn_rewards"]) for r in batch.to_pylist()]
        assert line["reward_mean"] == pytest.approx(sum(totals) / len(totals), abs=1e-6)
    for line in stats:
        assert line["env/turns_mean"] >= 1
        assert 0 < line["env/masked_token_fraction"] < 1
        assert sum(line[f"env/finished_{r}"] for r in ("stop", "length", "max_turns")) == 8
    samples = [json.loads(s) for s in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert any(" then 1 more" in sample["response"] for sample in samples)
