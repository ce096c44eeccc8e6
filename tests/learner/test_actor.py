"""The learner actor: in process, which trainer it holds and what it hands that trainer (PPO and
critic-free), and that non-finite weights are never published; on a real local Ray instance, PPO
steps, the rollout-id ledger, policy lag, and one weight publication that a generator (plain
transformers engine) loads exactly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from support.batches import scored_batch
from support.probes import generator_greedy, learner_greedy, learner_version

from rlfleet.common.config import (
    CheckpointConfig,
    CriticFreeConfig,
    GeneratorConfig,
    MetricsConfig,
    PPOConfig,
)
from rlfleet.common.schema import concat_batches, prompt_batch, with_columns
from rlfleet.learner import actor as actor_module
from rlfleet.learner.actor import LearnerActor, LearnerSettings, learner_device, torch_threads
from rlfleet.learner.batches import generator_mismatch_stats, rollout_tensors
from rlfleet.trainers.guards import NonFiniteError

BATCH = 4


def learner_batch(
    first_id: int, version: int = 0, score: float = 0.5, size: int = BATCH
) -> pa.RecordBatch:
    """``size`` rollouts with fixed token ids (the tiny vocabulary has > 40 tokens)."""
    return scored_batch(
        range(first_id, first_id + size),
        [score + 0.1 * i for i in range(size)],
        policy_version=version,
        prompt_ids=[[5 + i, 9, 17] for i in range(size)],
        response_ids=[[11, 23 + i, 31, 40] for i in range(size)],
        response_logprobs=[[-1.0] * 4] * size,
        finish_reason=["length"] * size,
    )


def test_generator_mismatch_stats_compare_its_logprobs_with_the_learners_and_count_truncations():
    batch = with_columns(
        prompt_batch([0, 1, 2], ["p"] * 3, [[5]] * 3),
        response_ids=[[11, 12], [13, 14, 15], [16]],
        response_logprobs=[[-1.0, -2.0], [-0.5, -0.5, -0.5], [-3.0]],
        finish_reason=["length", "stop", "length"],
    )
    # the trainer's old logprobs: [batch, longest response], zero past each response
    old = np.array([[-1.5, -2.0, 0.0], [-0.5, -1.0, -0.25], [-1.0, 0.0, 0.0]])
    stats = generator_mismatch_stats(batch, old)
    assert stats["rollout/logprob_diff_mean"] == pytest.approx((0.5 + 0 + 0 + 0.5 + 0.25 + 2) / 6)
    assert stats["rollout/truncated_fraction"] == pytest.approx(2 / 3)


def test_generator_mismatch_stats_read_a_one_token_batch_whose_old_logprobs_are_a_number():
    batch = with_columns(
        prompt_batch([0], ["p"], [[5]]),
        response_ids=[[11]],
        response_logprobs=[[-1.0]],
        finish_reason=["stop"],
    )
    stats = generator_mismatch_stats(batch, -1.25)
    assert stats == {"rollout/logprob_diff_mean": 0.25, "rollout/truncated_fraction": 0.0}


def test_rollouts_without_a_logprob_per_response_token_are_named():
    batch = with_columns(learner_batch(0), response_logprobs=[[-1.0] * 4] * 3 + [[-1.0] * 3])
    with pytest.raises(ValueError, match="rollout 3: 3 response_logprobs for 4 tokens"):
        rollout_tensors(batch)
    batch = with_columns(learner_batch(0), response_logprobs=[None] + [[-1.0] * 4] * 3)
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


def test_torch_threads_are_num_cpus_else_the_nodes_cores_shared_by_colocated_ranks(monkeypatch):
    monkeypatch.setattr(actor_module, "node_cores", lambda: 8)
    assert torch_threads(2.0, colocated=True, ranks_on_node=2) == 2
    assert torch_threads(0.5, colocated=True) == 1
    assert torch_threads(None, colocated=True) == 8
    assert torch_threads(None, colocated=True, ranks_on_node=3) == 2
    assert torch_threads(None, colocated=True, ranks_on_node=16) == 1
    assert torch_threads(None, colocated=False, ranks_on_node=1) == 1


GRPO = CriticFreeConfig(algorithm="grpo", batch_size=8, learning_rate=1e-2, max_completion_length=8)


def grouped_batch(first_id: int = 0, version: int = 0) -> pa.RecordBatch:
    """8 rollouts of 2 prompts (groups ``first_id`` and ``first_id + 4``), as two shards that
    each hold half of both groups came back: the groups interleave."""
    batch = learner_batch(first_id, version, size=8)
    order = [0, 1, 4, 5, 2, 3, 6, 7]
    batch = batch.take(pa.array(order))
    rollout_ids = batch.column("rollout_id").to_pylist()
    return with_columns(
        batch,
        group_id=[first_id + 4 * ((i - first_id) // 4) for i in rollout_ids],
        response_logprobs=[[-1.0, -2.0, -0.5, -1.5]] * 8,
        finish_reason=["length", "stop"] * 4,
    )


def in_process_learner(model_dir: Path, config: PPOConfig | CriticFreeConfig) -> LearnerActor:
    algorithm = getattr(config, "algorithm", "ppo")  # a PPOConfig names none
    settings = LearnerSettings(
        str(model_dir), algorithm, config, metrics=MetricsConfig(enabled=False)
    )
    return LearnerActor(settings)


class RecordingPublisher:
    def publish(self, named_tensors, version):
        self.state_dict, self.version = dict(named_tensors), version
        return type("Handle", (), {"version": version, "nbytes": 0})()


def test_a_critic_free_learner_trains_a_plain_causal_lm_without_a_reference_when_beta_is_0(
    tiny_model_dir: Path,
) -> None:
    from rlfleet import CriticFreeTrainer

    learner = in_process_learner(tiny_model_dir, GRPO)
    assert isinstance(learner.trainer, CriticFreeTrainer)
    assert learner.trainer.ref_model is None
    assert learner.policy is learner.trainer.model
    with_reference = in_process_learner(tiny_model_dir, GRPO.model_copy(update={"beta": 0.04}))
    assert with_reference.trainer.ref_model is not None


def test_a_critic_free_step_gets_whole_groups_the_generators_logprobs_and_truncations(
    tiny_model_dir: Path,
) -> None:
    learner = in_process_learner(tiny_model_dir, GRPO)
    calls = []
    step = learner.trainer.step
    learner.trainer.step = lambda *args, **kwargs: calls.append(kwargs) or step(*args, **kwargs)
    batch = grouped_batch(0)

    stats = learner.step(batch)

    (inputs,) = calls
    assert inputs["group_ids"] == [0, 0, 0, 0, 4, 4, 4, 4]
    responses = [r.tolist() for r in inputs["responses"]]
    assert responses == [[11, 23 + i, 31, 40] for i in [0, 1, 2, 3, 4, 5, 6, 7]]
    assert [s.item() for s in inputs["scores"]] == pytest.approx([0.5 + 0.1 * i for i in range(8)])
    assert all(lp.tolist() == [-1.0, -2.0, -0.5, -1.5] for lp in inputs["behaviour_logprobs"])
    assert inputs["truncated"] == [True, False, True, False, True, False, True, False]
    assert learner.version == 1 and learner.consumed == [0, 1, 4, 5, 2, 3, 6, 7]
    for key in ("critic_free/loss", "critic_free/entropy", "critic_free/reward/mean"):
        assert isinstance(stats[key], float), key
    assert stats["rollout/logprob_diff_mean"] > 0
    assert 0 <= stats["rollout/tis_capped_fraction"] <= 1
    assert stats["rollout/truncated_fraction"] == 0.5
    assert "time/grpo/total" in stats and json.dumps(stats)
    loss = learner.metrics.registry.get_sample_value(
        "rlfleet_learner_total_loss", learner.metrics.labels
    )
    assert loss == stats["critic_free/loss"]
    with pytest.raises(ValueError, match="rollout 0 was already consumed"):
        learner.step(batch)


def test_a_ppo_step_gets_the_generators_logprobs_for_truncated_importance_sampling(
    tiny_model_dir: Path,
) -> None:
    config = PPOConfig(batch_size=BATCH, mini_batch_size=2, ppo_epochs=1, tis_cap=2.0)
    learner = in_process_learner(tiny_model_dir, config)
    calls = []
    step = learner.trainer.step
    learner.trainer.step = lambda *args, **kwargs: calls.append(kwargs) or step(*args, **kwargs)
    batch = with_columns(
        learner_batch(0), response_logprobs=[[-1.0, -2.0, -0.5, -1.5 - i] for i in range(BATCH)]
    )

    stats = learner.step(batch)

    (inputs,) = calls
    behaviour = [lp.tolist() for lp in inputs["behaviour_logprobs"]]
    assert behaviour == [[-1.0, -2.0, -0.5, -1.5 - i] for i in range(BATCH)]
    assert all(lp.dtype == torch.float32 for lp in inputs["behaviour_logprobs"])
    assert stats["rollout/logprob_diff_mean"] > 0
    assert 0 <= stats["rollout/tis_capped_fraction"] <= 1
    assert learner.version == 1


def test_a_critic_free_step_with_every_sample_masked_out_trains_nothing_and_goes_on(
    tiny_model_dir: Path,
) -> None:
    config = GRPO.model_copy(update={"mask_truncated_completions": True})
    learner = in_process_learner(tiny_model_dir, config)
    batch = with_columns(grouped_batch(0), finish_reason=["length"] * 8)
    before = {name: weight.clone() for name, weight in learner.policy.state_dict().items()}

    stats = learner.step(batch)

    assert "critic_free/loss" not in stats and stats["rollout/truncated_fraction"] == 1.0
    assert learner.version == 1
    for name, weight in learner.policy.state_dict().items():
        assert torch.equal(before[name], weight), name
    reward = learner.metrics.registry.get_sample_value(
        "rlfleet_learner_mean_reward", learner.metrics.labels
    )
    assert reward == stats["critic_free/reward/mean"]


def test_either_learner_publishes_its_causal_lm_without_a_value_head(tiny_model_dir: Path) -> None:
    for config in (PPOConfig(batch_size=BATCH, mini_batch_size=2), GRPO):
        learner = in_process_learner(tiny_model_dir, config)
        learner._publisher = RecordingPublisher()
        learner.publish_weights()
        names = set(learner._publisher.state_dict)
        assert names == set(learner.policy.state_dict()), type(config).__name__
        assert not any("v_head" in name for name in names)


def test_a_critic_free_learner_resumes_its_weights_and_ledger_from_a_checkpoint(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    checkpoint = CheckpointConfig(uri=str(tmp_path / "checkpoints"))
    learner = in_process_learner(tiny_model_dir, GRPO)
    learner.step(grouped_batch(0))
    learner.save_checkpoint(checkpoint, {"iteration": 1})
    assert learner.wait_for_checkpoint()

    resumed = in_process_learner(tiny_model_dir, GRPO)
    state = resumed.load_checkpoint(checkpoint.uri, checkpoint)
    assert state["iteration"] == 1
    assert (resumed.version, resumed.consumed) == (1, learner.consumed)
    for name, weight in learner.policy.state_dict().items():
        assert torch.equal(resumed.policy.state_dict()[name], weight), name
    with pytest.raises(ValueError, match="rollout 0 was already consumed"):
        resumed.step(grouped_batch(0))
    resumed.step(grouped_batch(8, 1))
    learner.step(grouped_batch(8, 1))  # the optimizer's state was restored too: same update
    for name, weight in learner.policy.state_dict().items():
        assert torch.equal(resumed.policy.state_dict()[name], weight), name


# ----------------------------------------------------------------------------------------------
# Non-finite weights are never published (the trainers' guards: tests/trainers/test_guards.py)


def nan_gradients(trainer) -> None:
    """A finite loss whose backward pass leaves a NaN gradient on the LM head."""
    trainer.model.pretrained_model.lm_head.weight.register_hook(lambda grad: grad * math.nan)


def test_the_learner_refuses_non_finite_weights_before_publishing_or_counting(tiny_model_dir):
    config = PPOConfig(batch_size=4, mini_batch_size=4, ppo_epochs=1)  # one optimizer step
    learner = in_process_learner(tiny_model_dir, config)
    optimizer_step = learner.trainer.optimizer.step

    def step_to_nan(*args, **kwargs):
        optimizer_step(*args, **kwargs)
        with torch.no_grad():
            learner.trainer.model.pretrained_model.lm_head.weight[0, 0] = math.nan

    learner.trainer.optimizer.step = step_to_nan
    with pytest.raises(NonFiniteError, match=r"^step 1 \(rollouts 0\.\.3\): weight .* not fin"):
        learner.step(learner_batch(0))
    assert learner.version == 0
    assert learner.consumed_rollout_ids() == []


def test_skipped_steps_are_in_the_learner_stats(tiny_model_dir):
    config = PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=1, nonfinite="skip")
    learner = in_process_learner(tiny_model_dir, config)
    nan_gradients(learner.trainer)
    stats = learner.step(learner_batch(0))
    assert stats["ppo/nonfinite_skipped_steps"] == 2.0
    assert learner.version == 1


@pytest.fixture
def learner(ray_local, tiny_model_dir: Path):
    import ray

    from rlfleet.learner.actor import LearnerActor

    config = PPOConfig(batch_size=BATCH, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-2)
    settings = LearnerSettings(str(tiny_model_dir), "ppo", config, seed=0)
    actor = ray.remote(LearnerActor).options(num_cpus=0.5).remote(settings)
    ray.get(actor.ready.remote())
    yield actor
    ray.kill(actor)


@pytest.mark.slow
def test_a_step_trains_once_on_every_rollout_and_bumps_the_policy_version(learner) -> None:
    import ray

    stats = ray.get(learner.step.remote(learner_batch(0)))

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

    ray.get(learner.step.remote(learner_batch(0, version=0)))
    with pytest.raises(ray.exceptions.RayTaskError, match="rollout 3 was already consumed"):
        ray.get(learner.step.remote(learner_batch(3, version=1)))
    duplicated = concat_batches([learner_batch(10, 1, size=2)] * 2)
    with pytest.raises(ray.exceptions.RayTaskError, match="rollout 10 was already consumed"):
        ray.get(learner.step.remote(duplicated))

    assert learner_version(learner) == 1
    assert ray.get(learner.consumed_rollout_ids.remote()) == [0, 1, 2, 3]


@pytest.mark.slow
def test_rollouts_sampled_with_a_stale_policy_are_refused_by_default(learner) -> None:
    import ray

    ray.get(learner.step.remote(learner_batch(0, version=0)))
    with pytest.raises(
        ray.exceptions.RayTaskError, match="rollout 4: sampled with policy version 0"
    ):
        ray.get(learner.step.remote(learner_batch(4, version=0)))


@pytest.mark.slow
def test_a_non_finite_score_names_its_rollout(learner) -> None:
    import ray

    batch = learner_batch(0)
    batch = with_columns(batch, score=[0.1, float("nan"), 0.2, 0.3])
    with pytest.raises(ray.exceptions.RayTaskError, match="rollout 1: score is nan"):
        ray.get(learner.step.remote(batch))
    assert learner_version(learner) == 0


@pytest.mark.slow
def test_published_weights_load_into_a_generator_whose_greedy_output_matches_the_learner(
    learner, tiny_model_dir: Path
) -> None:
    import ray

    from rlfleet.actors.generator import RemoteGenerator

    generator = RemoteGenerator.options(num_cpus=0.5).remote(
        0, str(tiny_model_dir), GeneratorConfig(engine="hf"), 0
    )
    probe = [[5, 9, 17], [6, 9, 17, 30]]
    try:
        before = learner_greedy(learner, probe, 6)
        ray.get(learner.step.remote(learner_batch(0)))
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
