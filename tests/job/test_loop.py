"""The job's loop with fake learner, generator and reward actors on a real local Ray: which
batch is sampled with which policy, overlap, checkpoints, resume, restarts, stats and metrics."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pyarrow as pa
import pytest
import ray
from driver_fakes import CRITIC_FREE_LEARNER_STATS, LEARNER_STATS, fake_factories
from support.batches import scored_batch
from support.job_configs import PROMPTS, quiet_job, read_stats

from rlfleet.common.config import CheckpointConfig, JobConfig
from rlfleet.common.transport import resolved_weight_sync
from rlfleet.job.data import read_prompt_rows
from rlfleet.job.loop import (
    JobResult,
    StageTimer,
    TrainingJob,
    checkpoint_due,
    reference_kl,
)
from rlfleet.job.metrics import STAGES
from rlfleet.job.rollout_stats import component_means
from rlfleet.learner.rank_group import ActorWaitError

ROWS = read_prompt_rows(PROMPTS, "prompt")


@pytest.mark.parametrize(
    ("uri", "every", "due"),
    [
        ("ckpt", 2, [2, 4, 5]),
        ("ckpt", 0, [5]),
        ("ckpt", 1, [1, 2, 3, 4, 5]),
        (None, 1, []),
    ],
)
def test_checkpoints_are_due_every_n_iterations_and_after_the_last(
    uri: str | None, every: int, due: list[int]
) -> None:
    config = CheckpointConfig(uri=uri, every=every)
    assert [i for i in range(1, 6) if checkpoint_due(config, i, iterations=5)] == due


def test_stage_timer_adds_up_each_stage_for_the_stats_line() -> None:
    timer = StageTimer()
    timer.add("generate", 0.25)
    with timer.stage("generate"):
        pass
    with timer.stage("score"):
        pass
    assert set(timer.seconds) == {"generate", "score"}
    assert 0.25 <= timer.seconds["generate"] < 0.5
    assert timer.stats() == {f"time/{k}_s": v for k, v in timer.seconds.items()}


def train(
    config: JobConfig, on_dispatch=None, resume_from: str | None = None
) -> tuple[JobResult, TrainingJob]:
    job = TrainingJob(config, ROWS, on_dispatch, fake_factories(config))
    try:
        if resume_from:
            job.resume(resume_from)
        return job.train(), job
    finally:
        job.shutdown()


def job_metric(job: TrainingJob, name: str, **labels: str) -> float | None:
    labels = {"job": job.config.name, "role": "job", "index": "0", **labels}
    return job.metrics.registry.get_sample_value(name, labels)


def test_each_batch_is_trained_once_with_stats_and_metrics_from_one_timing(
    ray_local, tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = quiet_job(
        tiny_model_dir,
        tmp_path / "run",
        iterations=3,
        generators={"num_actors": 2},
        reward={"num_actors": 2},
    )
    result, job = train(config)

    stats = read_stats(tmp_path / "run")
    assert stats == result.stats
    assert [line["iteration"] for line in stats] == [1, 2, 3]
    assert [line["policy_version"] for line in stats] == [1, 2, 3]
    assert [line["samples"] for line in stats] == [8, 8, 8]
    assert [line["rollout_ids"] for line in stats] == [[0, 7], [8, 15], [16, 23]]
    assert [line["sampled_with_versions"] for line in stats] == [[0], [1], [2]]
    assert result.consumed_rollout_ids == list(range(24))
    assert stats[0]["reward_mean"] == pytest.approx(7 / 8)  # rollout i scores i % 3
    assert stats[0]["response_length_mean"] == 3.0
    kept = ["objective/kl", "objective/kl_coef", "ppo/loss/policy", "rollout/logprob_diff_mean"]
    times = {f"time/{stage}_s" for stage in STAGES}
    for line in stats:
        assert {k: line[k] for k in kept} == {k: LEARNER_STATS[k] for k in kept}
        assert "time/ppo/total" not in line and "env/reward_mean" not in line
        assert set(line) >= times and all(line[k] >= 0 for k in times)
        assert line["generator_restarts"] == line["reward_restarts"] == 0
        assert line["learner_restarts"] == 0

    assert job_metric(job, "rlfleet_job_samples_total") == 24
    assert job_metric(job, "rlfleet_job_prompts_total") == 24
    assert job_metric(job, "rlfleet_job_tokens_total") == 24 * 3
    assert job_metric(job, "rlfleet_job_inflight_rollouts") == 0
    for stage in STAGES:
        seconds = sum(line[f"time/{stage}_s"] for line in stats)
        assert job_metric(job, "rlfleet_job_stage_seconds_sum", stage=stage) == pytest.approx(
            seconds
        )
        assert job_metric(job, "rlfleet_job_stage_seconds_count", stage=stage) == 3


@pytest.mark.parametrize(
    ("one_step_off", "lag", "versions", "published", "dispatches"),
    [
        (False, 0, [[0], [1], [2], [3]], [1, 2, 3, 4], "g0 r0 g1 r1 g2 r2 g3 r3"),
        (False, 1, [[0], [0], [2], [2]], [2, 4], "g0 r0 g1 r1 g2 r2 g3 r3"),
        # Batch k+1 goes out before batch k is scored and trained on: it is sampled with k-1.
        (True, 1, [[0], [0], [1], [2]], [1, 2, 3, 4], "g0 g0 r0 g1 r1 g2 r2 r3"),
    ],
    ids=["on-policy", "lag-1", "one-step-off"],
)
def test_generators_sample_with_the_policy_that_lag_and_overlap_allow(
    ray_local,
    tiny_model_dir: Path,
    tmp_path: Path,
    one_step_off: bool,
    lag: int,
    versions: list[list[int]],
    published: list[int],
    dispatches: str,
) -> None:
    config = quiet_job(
        tiny_model_dir,
        tmp_path / "run",
        iterations=4,
        one_step_off=one_step_off,
        max_policy_lag=lag,
    )
    sent = []
    job = TrainingJob(
        config, ROWS, lambda kind, i, _: sent.append(f"{kind[0]}{i}"), fake_factories(config)
    )
    try:
        result = job.train()
        assert ray.get(job.learner.ranks[0].published_versions.remote()) == published
    finally:
        job.shutdown()

    assert [line["sampled_with_versions"] for line in result.stats] == versions
    assert " ".join(sent) == dispatches
    assert result.consumed_rollout_ids == list(range(32))


def test_restarted_actors_get_the_current_weights_and_a_new_discovery_file(
    ray_local, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Reward actor 1 dies scoring batch 1 (and is restarted while generator 1 lies dead);
    generator 1, killed idle, is found dead by the sync after step 1; generator 0 dies sampling
    batch 2. Only the shards in flight are sent again, the new generators sample with the
    current policy, and Prometheus is pointed at the new processes."""
    killed = []

    def kill_idle_generator_1(kind: str, iteration: int, actors: list) -> None:
        if (kind, iteration) == ("reward", 0):
            generator_1 = job.generators.actors[1]
            ray.kill(generator_1, no_restart=True)
            killed.append(generator_1)

    config = quiet_job(
        tiny_model_dir,
        tmp_path / "run",
        name=f"fake-restarts-{os.getpid()}",
        iterations=3,
        generators={"num_actors": 2},
        reward={"num_actors": 2},
        metrics={"enabled": True, "file_sd_dir": str(tmp_path / "sd")},
    )
    factories = fake_factories(config, die_on_call={("reward", 1): 1, ("generator", 0): 2})
    job = TrainingJob(config, ROWS, kill_idle_generator_1, factories)
    try:
        result = job.train()
        listed = {group["targets"][0] for group in json.loads(job.metrics_targets.path.read_text())}
        actors = [job.learner.ranks[0], *job.generators.actors, *job.rewards.actors]
        targets = [job.metrics.target, *ray.get([a.metrics_target.remote() for a in actors])]
    finally:
        job.shutdown()

    assert len(killed) == 1
    assert listed == {target.address for target in targets}
    assert not job.metrics_targets.path.exists()
    assert (result.generator_restarts, result.reward_restarts) == (2, 1)
    assert [line["generator_restarts"] for line in result.stats] == [1, 2, 2]
    assert [line["reward_restarts"] for line in result.stats] == [1, 1, 1]
    assert [line["sampled_with_versions"] for line in result.stats] == [[0], [1], [2]]
    assert [line["samples"] for line in result.stats] == [8, 8, 8]
    assert result.consumed_rollout_ids == list(range(24))
    assert job_metric(job, "rlfleet_job_actor_restarts_total", actor_role="generator") == 2
    assert job_metric(job, "rlfleet_job_actor_restarts_total", actor_role="reward") == 1


@pytest.mark.parametrize("one_step_off", [False, True], ids=["on-policy", "one-step-off"])
def test_checkpoints_hold_the_first_untrained_batch_and_a_resumed_job_continues_there(
    ray_local, tiny_model_dir: Path, tmp_path: Path, one_step_off: bool
) -> None:
    """Checkpoint 2 is saved while batch 3 may already be out with the generators: a job resumed
    from it samples batch 3 again, and stats.jsonl drops the first run's line 3."""
    uri = tmp_path / "checkpoints"
    config = quiet_job(
        tiny_model_dir,
        tmp_path / "run",
        iterations=3,
        one_step_off=one_step_off,
        max_policy_lag=1,
        checkpoint={"uri": str(uri), "every": 2},
    )
    first, job = train(config)
    states = {path.name: json.loads(path.read_text()) for path in uri.glob("step-*.json")}
    assert {name: state["next_rollout_id"] for name, state in states.items()} == {
        "step-00000002.json": 16,
        "step-00000003.json": 24,
    }
    assert states["step-00000002.json"]["dataset"] == {"epoch": 0, "offset": 16}
    assert states["step-00000002.json"]["iteration"] == 2
    assert job_metric(job, "rlfleet_job_checkpoint_seconds_count") == 2

    resumed, _ = train(
        config.model_copy(update={"iterations": 4}),
        resume_from=str(uri / "step-00000002.json"),
    )

    stats = read_stats(tmp_path / "run")
    assert [line["iteration"] for line in stats] == [1, 2, 3, 4]
    assert [line["rollout_ids"] for line in stats] == [[0, 7], [8, 15], [16, 23], [24, 31]]
    assert stats[:2] == first.stats[:2]
    assert stats[2:] == resumed.stats
    assert resumed.consumed_rollout_ids == list(range(32))


def train_reading_groups(
    config: JobConfig, resume_from: str | None = None
) -> tuple[JobResult, list[dict[int, list[int]]], TrainingJob]:
    """Trains with the fakes; also returns the rollout ids of each group id in each step."""
    job = TrainingJob(config, ROWS, None, fake_factories(config))
    try:
        if resume_from:
            job.resume(resume_from)
        result = job.train()
        return result, ray.get(job.learner.ranks[0].trained_groups.remote()), job
    finally:
        job.shutdown()


def test_a_critic_free_job_trains_on_whole_groups_of_samples_with_unique_group_ids(
    ray_local, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """grpo, 4 samples per prompt, 8 samples per step: 2 prompts an iteration, their samples
    split over 2 generators and 2 reward actors, whole groups again at the learner; group ids
    go on across a resume."""
    uri = tmp_path / "checkpoints"
    config = quiet_job(
        tiny_model_dir,
        tmp_path / "run",
        algorithm="grpo",
        iterations=3,
        generators={"num_actors": 2},
        reward={"num_actors": 2},
        checkpoint={"uri": str(uri), "every": 2},
    )
    assert (config.samples_per_iteration, config.prompts_per_iteration) == (8, 2)
    first, groups, job = train_reading_groups(config)

    assert groups == [
        {0: [0, 1, 2, 3], 4: [4, 5, 6, 7]},
        {8: [8, 9, 10, 11], 12: [12, 13, 14, 15]},
        {16: [16, 17, 18, 19], 20: [20, 21, 22, 23]},
    ]
    assert first.consumed_rollout_ids == list(range(24))
    stats = read_stats(tmp_path / "run")
    assert [(line["samples"], line["prompts"]) for line in stats] == [(8, 2)] * 3
    assert job_metric(job, "rlfleet_job_samples_total") == 24
    assert job_metric(job, "rlfleet_job_prompts_total") == 6
    kept = ["critic_free/loss", "critic_free/kl", "rollout/tis_capped_fraction"]
    for line in stats:
        assert {k: line[k] for k in kept} == {k: CRITIC_FREE_LEARNER_STATS[k] for k in kept}
        assert "time/grpo/total" not in line

    resumed, groups, _ = train_reading_groups(
        config.model_copy(update={"iterations": 4}), resume_from=str(uri / "step-00000002.json")
    )
    assert groups == [
        {16: [16, 17, 18, 19], 20: [20, 21, 22, 23]},
        {24: [24, 25, 26, 27], 28: [28, 29, 30, 31]},
    ]
    assert resumed.consumed_rollout_ids == list(range(32))


def test_the_progress_bar_shows_the_kl_to_the_reference_of_either_trainer() -> None:
    assert reference_kl({"objective/kl": 0.25}) == "0.250"
    assert reference_kl({"critic_free/kl": 0.5}) == "0.500"
    assert reference_kl({"critic_free/kl_in_reward": 0.125}) == "0.125"
    assert reference_kl({"critic_free/loss": 1.0}) == "-"  # beta and kl_coef 0: no reference


def scored_with_components(parts: list[dict[str, float] | None]) -> pa.RecordBatch:
    n = len(parts)
    return scored_batch(
        range(n),
        [sum((row or {}).values()) for row in parts],
        prompt_ids=[[1]] * n,
        response_ids=[[2, 3]] * n,
        score_components=parts,
    )


def test_each_reward_component_gets_its_mean_in_the_stats_line() -> None:
    scored = scored_with_components(
        [{"correct": 1.0, "short": -0.5}, {"correct": 0.0, "short": -1.5}]
    )
    assert component_means(scored) == {"reward/correct_mean": 0.5, "reward/short_mean": -1.0}
    assert component_means(scored_with_components([None, None])) == {}

    job = SimpleNamespace(
        iteration=1,
        learner_restarts=0,
        generators=SimpleNamespace(restarts=0),
        rewards=SimpleNamespace(restarts=0),
    )
    line = TrainingJob.stats_line(job, scored, {"objective/kl": 0.1})
    assert line["reward/correct_mean"] == 0.5
    assert line["reward/short_mean"] == -1.0
    assert line["reward_mean"] == pytest.approx(-0.5)


@pytest.mark.parametrize(
    ("placement", "slept"),
    [("colocated", True), ("disaggregated", False)],
)
def test_generators_sharing_the_learners_gpus_sleep_while_it_trains(
    ray_local, tiny_model_dir: Path, tmp_path: Path, placement: str, slept: bool
) -> None:
    config = quiet_job(
        tiny_model_dir,
        tmp_path / "run",
        iterations=2,
        placement=placement,
        learner={"num_ranks": 2, "num_gpus": 0.5},
        generators={"num_actors": 2, "num_gpus": 0.5},
        weight_sync={"transport": "object_store"},  # the fakes form no collective group
    )
    assert config.colocated_on_gpus is slept
    job = TrainingJob(config, ROWS, None, fake_factories(config))
    try:
        job.train()
        histories = ray.get([g.history.remote() for g in job.generators.actors])
    finally:
        job.shutdown()
    asleep = ["sleep", "wake_up"] if slept else []
    iteration = ["generate", *asleep, "load_weights"]
    assert histories == [iteration * 2] * 2


@pytest.mark.parametrize(
    ("gpus", "transport"),
    [(0.0, "object_store"), (0.5, "collective")],
)
def test_weight_sync_auto_is_resolved_once_for_the_learner_generators_and_sync(
    ray_local,
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    gpus: float,
    transport: str,
) -> None:
    from rlfleet.job import loop

    resolved: list[str] = []

    def resolve_once(config: JobConfig) -> Any:
        resolved.append(config.weight_sync.transport)
        return resolved_weight_sync(config)

    monkeypatch.setattr(loop, "resolved_weight_sync", resolve_once)
    config = quiet_job(
        tiny_model_dir,
        tmp_path / "run",
        learner={"num_gpus": gpus},
        generators={"num_gpus": gpus},
    )
    assert config.weight_sync.transport == "auto"
    job = TrainingJob(config, ROWS, None, fake_factories(config))
    try:
        assert job.weight_sync.transport == transport
        assert job.sync.config is job.weight_sync
        job.replace_learner(ActorWaitError("learner rank 0 died", ["learner rank 0"]))
        assert job.sync.config is job.weight_sync  # the new ranks' sync: not resolved again
        assert resolved == ["auto"]
    finally:
        job.shutdown()
