"""How the job's actors are started: the learner, generator i and reward actor i, from the job
config. The job's tests start fakes of the same interface instead."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray

from rlfleet.common.config import CriticFreeConfig, JobConfig, PPOConfig


@dataclass(frozen=True)
class ActorFactories:
    """``learner()``, ``generator(index)`` and ``reward(index)`` each start one Ray actor."""

    learner: Callable[[], Any]
    generator: Callable[[int], Any]
    reward: Callable[[int], Any]

    @classmethod
    def from_config(cls, config: JobConfig) -> ActorFactories:
        """The real actors (learner/actor.py, actors/generator.py, reward/actor.py) with the
        resources the config asks for."""
        from rlfleet.actors.generator import RemoteGenerator, generator_options
        from rlfleet.learner.actor import LearnerActor
        from rlfleet.reward.actor import RewardActor

        learner_cls = ray.remote(LearnerActor).options(
            num_cpus=config.learner.num_cpus, num_gpus=config.learner.num_gpus
        )
        generator_cls = RemoteGenerator.options(**generator_options(config.generators))
        reward_cls = ray.remote(RewardActor).options(
            num_cpus=config.reward.num_cpus, num_gpus=config.reward.num_gpus
        )
        return cls(
            learner=lambda: learner_cls.remote(
                config.model,
                seeded_trainer_config(config),
                config.seed,
                config.max_policy_lag,
                config.name,
                config.metrics,
                trust_remote_code=config.trust_remote_code,
            ),
            generator=lambda i: generator_cls.remote(
                i,
                config.model,
                config.generators,
                config.seed,
                config.name,
                config.metrics,
                trust_remote_code=config.trust_remote_code,
            ),
            reward=lambda i: reward_cls.remote(
                i,
                config.reward,
                config.name,
                config.metrics,
                trust_remote_code=config.trust_remote_code,
            ),
        )


def seeded_trainer_config(config: JobConfig) -> PPOConfig | CriticFreeConfig:
    """The learner trainer's config (``ppo`` or ``critic_free``, as ``algorithm`` says), seeded
    by the job's seed unless the section gives its own ``seed``."""
    trainer_config = config.trainer_config
    if "seed" in trainer_config.model_fields_set:
        return trainer_config
    return trainer_config.model_copy(update={"seed": config.seed})
