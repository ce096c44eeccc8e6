"""The learner actor on a real local Ray instance: PPO steps, the rollout-id ledger, policy lag,
and one weight publication that a generator (plain transformers engine) loads exactly."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from probes import generator_greedy, learner_greedy, learner_version

from rlfleet.common.config import GeneratorConfig, PPOConfig
from rlfleet.common.schema import concat_batches, prompt_batch, with_columns
from rlfleet.learner.actor import learner_device, rollout_stats, rollout_tensors

BATCH = 4


def scored_batch(
    first_id: int, version: int = 0, score: float = 0.5, size: int = BATCH
) -> pa.RecordBatch:
    """``size`` rollouts with fixed token ids (the tiny vocabulary has > 40 tokens)."""
    ids = list(range(first_id, first_id + size))
    prompts = [[5 + i, 9, 17] for i in range(size)]
    batch = prompt_batch(ids, ["p"] * size, prompts)
    return with_columns(
        batch,
        response=["r"] * size,
        response_ids=[[11, 23 + i, 31, 40] for i in range(size)],
        response_logprobs=[[-1.0] * 4] * size,
        finish_reason=["length"] * size,
        policy_version=[version] * size,
        score=[score + 0.1 * i for i in range(size)],
    )


def test_rollout_stats_compare_generator_logprobs_with_the_learners_and_count_truncations():
    batch = with_columns(
        prompt_batch([0, 1, 2], ["p"] * 3, [[5]] * 3),
        response_ids=[[11, 12], [13, 14, 15], [16]],
        response_logprobs=[[-1.0, -2.0], [-0.5, -0.5, -0.5], [-3.0]],
        finish_reason=["length", "stop", "length"],
    )
    # the trainer's old logprobs: [batch, longest response], zero past each response
    old = np.array([[-1.5, -2.0, 0.0], [-0.5, -1.0, -0.25], [-1.0, 0.0, 0.0]])
    stats = rollout_stats(batch, old)
    assert stats["rollout/logprob_diff_mean"] == pytest.approx((0.5 + 0 + 0 + 0.5 + 0.25 + 2) / 6)
    assert stats["rollout/truncated_fraction"] == pytest.approx(2 / 3)


def test_rollout_stats_read_a_one_token_batch_whose_old_logprobs_came_back_as_a_number():
    batch = with_columns(
        prompt_batch([0], ["p"], [[5]]),
        response_ids=[[11]],
        response_logprobs=[[-1.0]],
        finish_reason=["stop"],
    )
    stats = rollout_stats(batch, -1.25)
    assert stats == {"rollout/logprob_diff_mean": 0.25, "rollout/truncated_fraction": 0.0}


def test_rollouts_without_a_logprob_per_response_token_are_named():
    batch = with_columns(scored_batch(0), response_logprobs=[[-1.0] * 4] * 3 + [[-1.0] * 3])
    with pytest.raises(ValueError, match="rollout 3: 3 response_logprobs for 4 tokens"):
        rollout_tensors(batch)
    batch = with_columns(scored_batch(0), response_logprobs=[None] + [[-1.0] * 4] * 3)
    with pytest.raises(ValueError, match="rollout 0: no response_logprobs for 4 tokens"):
        rollout_tensors(batch)


def test_learner_device_is_the_gpu_ray_assigned_else_the_cpu(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [])
    assert learner_device() == torch.device("cpu")
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [3])
    assert learner_device() == torch.device("cuda", 0)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    assert learner_device() == torch.device("cpu")


@pytest.fixture
def learner(ray_local, tiny_model_dir: Path):
    import ray

    from rlfleet.learner.actor import LearnerActor

    config = PPOConfig(batch_size=BATCH, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-2)
    actor = ray.remote(LearnerActor).options(num_cpus=0.5).remote(str(tiny_model_dir), config, 0)
    ray.get(actor.ready.remote())
    yield actor
    ray.kill(actor)


@pytest.mark.slow
def test_a_step_trains_once_on_every_rollout_and_bumps_the_policy_version(learner) -> None:
    import ray

    stats = ray.get(learner.step.remote(scored_batch(0)))

    assert learner_version(learner) == 1
    assert ray.get(learner.consumed_rollout_ids.remote()) == [0, 1, 2, 3]
    for key in ("objective/kl", "objective/kl_coef", "ppo/loss/policy", "ppo/loss/value"):
        assert isinstance(stats[key], float), key
    assert stats["ppo/mean_scores"] == pytest.approx(0.65)
    assert stats["rollout/truncated_fraction"] == 1.0
    assert stats["rollout/logprob_diff_mean"] > 0
    assert json.dumps(stats)  # every value is a plain number


@pytest.mark.slow
def test_a_rollout_id_is_never_consumed_twice(learner) -> None:
    import ray

    ray.get(learner.step.remote(scored_batch(0, version=0)))
    with pytest.raises(ray.exceptions.RayTaskError, match="rollout 3 was already consumed"):
        ray.get(learner.step.remote(scored_batch(3, version=1)))
    duplicated = concat_batches([scored_batch(10, 1, size=2)] * 2)
    with pytest.raises(ray.exceptions.RayTaskError, match="rollout 10 was already consumed"):
        ray.get(learner.step.remote(duplicated))

    assert learner_version(learner) == 1
    assert ray.get(learner.consumed_rollout_ids.remote()) == [0, 1, 2, 3]


@pytest.mark.slow
def test_rollouts_sampled_with_a_stale_policy_are_refused_by_default(learner) -> None:
    import ray

    ray.get(learner.step.remote(scored_batch(0, version=0)))
    with pytest.raises(
        ray.exceptions.RayTaskError, match="rollout 4: sampled with policy version 0"
    ):
        ray.get(learner.step.remote(scored_batch(4, version=0)))


@pytest.mark.slow
def test_a_non_finite_score_names_its_rollout(learner) -> None:
    import ray

    batch = scored_batch(0)
    batch = with_columns(batch, score=[0.1, float("nan"), 0.2, 0.3])
    with pytest.raises(ray.exceptions.RayTaskError, match="rollout 1: score is nan"):
        ray.get(learner.step.remote(batch))
    assert learner_version(learner) == 0


@pytest.mark.slow
def test_published_weights_load_into_a_generator_whose_greedy_output_matches_the_learner(
    learner, tiny_model_dir: Path
) -> None:
    import ray

    from rlfleet.actors.generator import GeneratorActor

    generator = (
        ray.remote(GeneratorActor)
        .options(num_cpus=0.5)
        .remote(0, str(tiny_model_dir), GeneratorConfig(engine="hf"), 0)
    )
    probe = [[5, 9, 17], [6, 9, 17, 30]]
    try:
        before = learner_greedy(learner, probe, 6)
        ray.get(learner.step.remote(scored_batch(0)))
        handle = ray.get(learner.publish_weights.remote())
        assert handle.version == 1
        assert ray.get(generator.load_weights.remote(handle)) == 1
        after = learner_greedy(learner, probe, 6)
        completions = generator_greedy(generator, probe, 6)
    finally:
        ray.kill(generator)
    for mine, theirs in zip(after, completions, strict=True):
        assert theirs.token_ids == mine["token_ids"]
        assert theirs.logprobs == pytest.approx(mine["logprobs"], abs=1e-5)
    assert [a["logprobs"] for a in after] != [b["logprobs"] for b in before]
