"""A critic-free (GRPO) job end to end on real local Ray with real vLLM generators, reward and
learner actors: groups of samples across two generators, exact weight sync, and a resume."""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path

import pyarrow as pa
import pytest
from support.job_configs import read_stats, small_job
from support.tensorboard_files import tensorboard_scalars


@pytest.fixture(autouse=True)
def vllm_tmpdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """vLLM leaves sockets in TMPDIR: keep them in the test's directory."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))


def groups_of(batch: pa.RecordBatch) -> dict[int, list[dict]]:
    """The rollouts of each group id, in rollout id order."""
    groups: dict[int, list[dict]] = {}
    for row in sorted(batch.to_pylist(), key=lambda row: row["rollout_id"]):
        groups.setdefault(row["group_id"], []).append(row)
    return groups


@pytest.mark.slow
def test_a_grpo_job_trains_on_groups_syncs_exact_weights_and_resumes(
    ray_local, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """2 prompts x 4 samples an iteration over 2 generators; a reward that varies with the
    response's length, so that every group has an advantage to learn from."""
    from support.probes import generator_greedy, generator_version, job_learner_greedy

    from rlfleet.checkpoint.load import list_checkpoints
    from rlfleet.job.loop import TrainingJob
    from rlfleet.job.train import run_job

    checkpoint = {"uri": str(tmp_path / "checkpoints"), "every": 1}
    config = small_job(
        tiny_model_dir,
        tmp_path / "run",
        algorithm="grpo",
        generators={"num_actors": 2},
        reward={
            "function": "rlfleet.reward.functions:length_penalty",
            "kwargs": {"target": 0, "coef": 0.01},
        },
        critic_free={"learning_rate": 1e-2},
        iterations=3,
        checkpoint=checkpoint,
        logging={"samples_per_iteration": 4, "tensorboard": str(tmp_path / "tensorboard")},
    )
    job = TrainingJob(config)
    probe = [job.prompts.renderer.encode(row["prompt"]) for row in job.prompts.dataset.rows[:2]]
    scored = []
    score = job.score
    job.score = lambda rollouts: scored.append(score(rollouts)) or scored[-1]
    stats = []
    try:
        before = job_learner_greedy(job, probe, 8)
        queue = deque([job.dispatch_next_batch()])
        while queue:
            line = job.train_iteration(queue)
            stats.append(line)
            learner = job_learner_greedy(job, probe, 8)
            for generator in job.generators.actors:
                assert generator_version(generator) == job.iteration
                for mine, theirs in zip(
                    learner, generator_greedy(generator, probe, 8), strict=True
                ):
                    assert theirs.token_ids == mine["token_ids"]
                    assert theirs.logprobs == pytest.approx(mine["logprobs"], abs=1e-4)
        consumed = job.learner.consumed_rollout_ids()
        job.learner.wait_for_checkpoint()  # as TrainingJob.train does at its end
    finally:
        job.shutdown()

    assert consumed == list(range(24))
    changed = [a["logprobs"] != b["logprobs"] for a, b in zip(before, learner, strict=True)]
    assert all(changed), "training did not move the policy: the sync check would prove nothing"
    for iteration, (line, batch) in enumerate(zip(stats, scored, strict=True)):
        first = 8 * iteration
        groups = groups_of(batch)
        assert sorted(groups) == [first, first + 4]
        for group_id, rows in groups.items():
            assert [row["rollout_id"] for row in rows] == list(range(group_id, group_id + 4))
            assert len({row["prompt"] for row in rows}) == 1
            assert len({tuple(row["response_ids"]) for row in rows}) > 1, "one seed per group"
        assert (line["samples"], line["prompts"]) == (8, 2)
        assert line["sampled_with_versions"] == [iteration]
        assert isinstance(line["critic_free/loss"], float)
        assert line["rollout/logprob_diff_mean"] < 1e-2  # on-policy: vLLM's numerics only
        assert line["rollout/tis_capped_fraction"] == 0.0

    resumed = run_job(config.model_copy(update={"iterations": 4}), resume_from="latest")

    assert [line["iteration"] for line in resumed.stats] == [4]
    assert resumed.stats[0]["rollout_ids"] == [24, 31]
    assert resumed.stats[0]["prompts"] == 2
    assert resumed.consumed_rollout_ids == list(range(32))
    assert [info.step for info in list_checkpoints(checkpoint["uri"])] == [2, 3, 4]

    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").open()]
    assert [(s["iteration"], s["rollout_id"]) for s in samples] == [
        (i + 1, 8 * i + k) for i in range(4) for k in range(4)
    ]
    first_groups = [row for i, batch in enumerate(scored) for row in groups_of(batch)[8 * i]]
    for sample, row in zip(samples[:12], first_groups, strict=True):
        assert sample["prompt"] == row["prompt"] and sample["response"] == row["response"]
        assert sample["reward"] == row["score"]
    lines = read_stats(tmp_path / "run")
    reward_means = tensorboard_scalars(tmp_path / "tensorboard")["reward_mean"]
    assert [step for step, _ in reward_means] == [1, 2, 3, 4]
    assert [mean for _, mean in reward_means] == pytest.approx(
        [line["reward_mean"] for line in lines]
    )
