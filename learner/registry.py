"""The trainer registry: every algorithm a job can name (``JobConfig.algorithm``) as a
``TrainerSpec``, everything the learner needs to know about the trainer that runs it.

The name resolves once, where the learner's settings are made from the job config
(``LearnerSettings``, learner/actor.py); from there on the learner calls the trainer through
its spec alone: how to load the model (PPO: a causal LM with a value head; the critic-free
algorithms: the plain causal LM) and which part of it gets LoRA adapters, the trainer class and
its config's type, how a scored batch becomes the trainer's ``step`` arguments and its result the
learner's stats, which stats set the learner's gauges, and the advice a non-finite guard gives.

Adding an algorithm is registering its functions: a critic-free one is an advantage estimator
(algorithms/advantages.py) and its name in ``CriticFreeAlgorithm`` (common/trainer_configs.py), the
``CriticFreeTrainer`` spec is registered for every such name below; an algorithm whose update
differs brings its trainer and registers a ``TrainerSpec`` of its own here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, get_args

import pyarrow as pa
from pydantic import BaseModel
from torch import nn
from transformers import AutoModelForCausalLM

from rlfleet.algorithms.registry import Registry
from rlfleet.common.config import (
    TRAINER_SECTIONS,
    CriticFreeAlgorithm,
    CriticFreeConfig,
    PPOConfig,
)
from rlfleet.learner.batches import (
    generator_logprobs,
    generator_mismatch_stats,
    grouped,
    multi_turn_inputs,
    rollout_tensors,
    scalar_stats,
    truncated_flags,
    truncated_fraction,
)
from rlfleet.learner.metrics import PPO_STAT_GAUGES, StatGauges, critic_free_stat_gauges
from rlfleet.trainers.critic_free import CriticFreeTrainer
from rlfleet.trainers.guards import CRITIC_FREE_ADVICE, PPO_ADVICE
from rlfleet.trainers.ppo import PPOTrainer
from rlfleet.trainers.value_head import AutoModelForCausalLMWithValueHead

Trainer = Any
"""A trainer: ``step(**inputs) -> stats``, ``model``, ``config`` (``PPOTrainer``,
``CriticFreeTrainer``)."""


def in_order(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The batch as it came."""
    return batch


@dataclass(frozen=True)
class TrainerSpec:
    """How the learner runs one algorithm's trainer (its functions are module-level, so that a
    spec travels to the learner's ranks by reference)."""

    name: str
    """The algorithm, as ``JobConfig.algorithm`` and the checkpoints' identity name it."""
    trainer: type
    """Made as ``trainer(config=, model=, tokenizer=, parallel=, dtype=,
    gradient_checkpointing=, max_tokens_per_microbatch=)``."""
    config_type: type[BaseModel]
    """The type of its config (the job config's ``section``)."""
    model_class: type
    """Loads the model: ``model_class.from_pretrained(model_dir, trust_remote_code=...)``."""
    causal_lm: Callable[[nn.Module], nn.Module]
    """The causal LM in the model (what LoRA adapters go into)."""
    inputs: Callable[[pa.RecordBatch], dict[str, Any]]
    """A scored batch (in ``order``) -> the trainer's ``step`` keyword arguments."""
    stats: Callable[[Mapping[str, Any], pa.RecordBatch, Trainer], dict[str, float]]
    """``(step's result, the batch, the trainer)`` -> the learner's stats (plain floats)."""
    stat_gauges: Callable[[Any, Mapping[str, float]], StatGauges]
    """``(trainer config, the learner's stats)`` -> which stats set which learner gauge."""
    advice: str
    """What to do about a non-finite weight (trainers/guards.py)."""
    order: Callable[[pa.RecordBatch], pa.RecordBatch] = in_order
    """The batch's rows in the order its trainer takes them."""

    @property
    def section(self) -> str:
        """The job config's section that holds this trainer's config."""
        return TRAINER_SECTIONS[self.name]

    def check_config(self, config: Any) -> None:
        """Refuses a config of another trainer, or of another algorithm."""
        if not isinstance(config, self.config_type):
            raise ValueError(
                f"algorithm {self.name} trains with a {self.config_type.__name__} (the "
                f"{self.section} section), got a {type(config).__name__}"
            )
        named = getattr(config, "algorithm", self.name)
        if named != self.name:
            raise ValueError(f"algorithm {self.name}: its {self.section} config names {named}")

    def step(self, trainer: Trainer, batch: pa.RecordBatch) -> dict[str, float]:
        """One training step of ``trainer`` on a scored batch: the learner's stats."""
        batch = self.order(batch)
        return self.stats(trainer.step(**self.inputs(batch)), batch, trainer)


TRAINERS: Registry[TrainerSpec] = Registry("algorithm")


def register_trainer(spec: TrainerSpec) -> TrainerSpec:
    return TRAINERS.register(spec.name)(spec)


# ----------------------------------------------------------------------------------------------
# PPO: TRL v0.11.4's trainer, a value head on the causal LM


def value_head_lm(model: nn.Module) -> nn.Module:
    return model.pretrained_model


def ppo_inputs(batch: pa.RecordBatch) -> dict[str, Any]:
    """``PPOTrainer.step``'s arguments: the rollouts and the generator's logprobs (the behaviour
    policy, for truncated importance sampling); a multi-turn batch's loss masks and turn rewards
    (``multi_turn_inputs``)."""
    queries, responses, scores = rollout_tensors(batch)
    return {
        "queries": queries,
        "responses": responses,
        "scores": scores,
        "behaviour_logprobs": generator_logprobs(batch),
        **multi_turn_inputs(batch),
    }


def ppo_stats(
    step_stats: Mapping[str, Any], batch: pa.RecordBatch, trainer: PPOTrainer
) -> dict[str, float]:
    """TRL's stats, single numbers only, with the generators' mismatch and the optimizer steps
    ``ppo.nonfinite: skip`` skipped so far."""
    return {
        **scalar_stats(dict(step_stats)),
        **generator_mismatch_stats(batch, step_stats["objective/logprobs"]),
        "ppo/nonfinite_skipped_steps": float(trainer.nonfinite_skipped_steps),
    }


def ppo_stat_gauges(config: PPOConfig, stats: Mapping[str, float]) -> StatGauges:
    return PPO_STAT_GAUGES


register_trainer(
    TrainerSpec(
        name="ppo",
        trainer=PPOTrainer,
        config_type=PPOConfig,
        model_class=AutoModelForCausalLMWithValueHead,
        causal_lm=value_head_lm,
        inputs=ppo_inputs,
        stats=ppo_stats,
        stat_gauges=ppo_stat_gauges,
        advice=PPO_ADVICE,
    )
)


# ----------------------------------------------------------------------------------------------
# Critic-free (GRPO, RLOO, REINFORCE++, REINFORCE++-baseline): one trainer, the plain causal LM

CRITIC_FREE_STAT_PREFIX = "critic_free/"
"""The critic-free trainer's stats go out under this prefix, but for ``rollout/`` (shared with
PPO) and ``time/`` (timings, as PPO's ``time/ppo/``)."""


def plain_lm(model: nn.Module) -> nn.Module:
    return model


def critic_free_inputs(batch: pa.RecordBatch) -> dict[str, Any]:
    """``CriticFreeTrainer.step``'s arguments from a scored batch (``grouped``): the rollouts,
    their group ids, the generator's logprobs (the behaviour policy) and truncation flags; a
    multi-turn batch's loss masks and turn rewards (``multi_turn_inputs``)."""
    queries, responses, scores = rollout_tensors(batch)
    return {
        "queries": queries,
        "responses": responses,
        "scores": scores,
        "group_ids": batch.column("group_id").to_pylist(),
        "behaviour_logprobs": generator_logprobs(batch),
        "truncated": truncated_flags(batch),
        **multi_turn_inputs(batch),
    }


def critic_free_stats(
    step_stats: Mapping[str, float], batch: pa.RecordBatch, trainer: CriticFreeTrainer
) -> dict[str, float]:
    """A critic-free step's stats named as ``CRITIC_FREE_STAT_PREFIX`` says, plus the batch's
    ``rollout/truncated_fraction`` (as PPO's)."""
    stats = {
        key if key.startswith(("rollout/", "time/")) else CRITIC_FREE_STAT_PREFIX + key: value
        for key, value in step_stats.items()
    }
    return {**stats, "rollout/truncated_fraction": truncated_fraction(batch)}


def critic_free_gauges(config: CriticFreeConfig, stats: Mapping[str, float]) -> StatGauges:
    trained = (CRITIC_FREE_STAT_PREFIX + "loss") in stats  # no loss: every sample masked out
    return critic_free_stat_gauges(config.beta, config.kl_coef, trained)


for _algorithm in get_args(CriticFreeAlgorithm):
    register_trainer(
        TrainerSpec(
            name=_algorithm,
            trainer=CriticFreeTrainer,
            config_type=CriticFreeConfig,
            model_class=AutoModelForCausalLM,
            causal_lm=plain_lm,
            order=grouped,
            inputs=critic_free_inputs,
            stats=critic_free_stats,
            stat_gauges=critic_free_gauges,
            advice=CRITIC_FREE_ADVICE,
        )
    )
