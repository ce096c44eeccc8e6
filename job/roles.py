"""How the job's actors are started: the learner's ranks, generator i and reward actor i, from the
job config. The job's tests start fakes of the same interface instead.

Placement (``JobConfig.placement``): the learner's ranks always sit in one placement group, a
bundle per rank. Colocated on GPUs, generator i also sits in bundle ``i % num_ranks`` and shares
that rank's GPU (its engine sleeps while the learner trains); otherwise generators and reward
actors are scheduled wherever their own resources fit.

Deadlines (``job/pool.py``): a generator's shard is due ``generators.timeout_s`` plus
``SECONDS_PER_TOKEN`` for each token it may sample; a reward actor's ``reward.timeout_s`` (once per
component) plus ``REWARD_MARGIN_S``; a new actor of either must be ready within the learner's
start-up deadline.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import ray

from rlfleet.common.config import (
    CriticFreeConfig,
    GeneratorConfig,
    JobConfig,
    PPOConfig,
    RewardConfig,
    WeightSyncConfig,
)
from rlfleet.common.waits import LIVENESS_GROUPS
from rlfleet.job.pool import Deadline
from rlfleet.learner.rank_group import (
    DEADLINE_MARGIN_S,
    LearnerGroup,
    create_placement,
    in_bundle,
    start_learner_group,
)


@dataclass(frozen=True)
class ActorFactories:
    """``learner()`` starts the learner's ranks (a ``LearnerGroup``, not waited for: see
    ``LearnerGroup.ready_calls``); ``generator(index)``, ``reward(index)`` and
    ``eval_reward(index)`` each start one Ray actor (``eval_reward``: None unless held-out
    evaluation has its own reward, ``eval.reward``)."""

    learner: Callable[[], LearnerGroup]
    generator: Callable[[int], Any]
    reward: Callable[[int], Any]
    eval_reward: Callable[[int], Any] | None = None
    env: Callable[[int], Any] | None = None
    """Starts environment actor ``index`` of a multi-turn job (None: no ``env:``)."""

    @classmethod
    def from_config(cls, config: JobConfig, weight_sync: WeightSyncConfig) -> ActorFactories:
        """The real actors (learner/actor.py, actors/generator.py, reward/actor.py) with the
        resources and placement the config asks for; the learner publishes and the generators
        receive through ``weight_sync``, the job's resolved ``weight_sync``
        (``common.transport.resolved_weight_sync``)."""
        layout = Layout(config, weight_sync)
        eval_reward = config.eval.reward if config.eval else None
        return cls(
            learner=layout.start_learner,
            generator=layout.start_generator,
            reward=reward_factory(config, config.reward),
            env=layout.start_env if config.env else None,
            eval_reward=(
                reward_factory(config, eval_reward, first_index=config.reward.num_actors)
                if eval_reward
                else None
            ),
        )


def reward_factory(
    config: JobConfig, reward: RewardConfig, first_index: int = 0
) -> Callable[[int], Any]:
    """Starts reward actor ``index`` of ``reward`` (the job's, or eval's own) as actor
    ``first_index + index``: eval's reward actors come after the job's, so that each actor's
    metrics series is its own."""
    from rlfleet.reward.actor import RewardActor

    reward_cls = ray.remote(RewardActor).options(num_cpus=reward.num_cpus, num_gpus=reward.num_gpus)
    return lambda index: reward_cls.remote(
        first_index + index,
        reward,
        config.name,
        config.metrics,
        trust_remote_code=config.trust_remote_code,
    )


SECONDS_PER_TOKEN = 0.01
"""A generator's allowance for each token it may sample (rows x ``max_new_tokens``), on top of
``generators.timeout_s``: 100 tokens a second per row, sampled one row after another."""

REWARD_MARGIN_S = 30.0
"""A reward actor's allowance on top of ``reward.timeout_s`` (which bounds each reward source's
call): taking the shard, decoding its metadata, building the scored batch."""


def generator_deadline(config: JobConfig) -> Deadline:
    """How long a generator may take for a shard: ``generators.timeout_s`` plus
    ``SECONDS_PER_TOKEN`` per token to sample (the larger of training's and eval's
    ``max_new_tokens``, for each row)."""
    generators = config.generators
    tokens = max(generators.max_new_tokens, (config.eval and config.eval.max_new_tokens) or 0)
    return Deadline(
        generators.timeout_s,
        SECONDS_PER_TOKEN * tokens,
        f"generators.timeout_s {generators.timeout_s:g} s + {SECONDS_PER_TOKEN:g} s per token, "
        f"{tokens} tokens a row",
    )


def reward_deadline(reward: RewardConfig, key: str = "reward") -> Deadline:
    """How long a reward actor of ``reward`` (the job's, or eval's own under ``key``) may take for
    a shard: ``timeout_s`` for each reward source it calls, plus ``REWARD_MARGIN_S``."""
    sources = len(reward.components or [reward])
    each = f" x {sources} components" if sources > 1 else ""
    return Deadline(
        reward.timeout_s * sources + REWARD_MARGIN_S,
        source=f"{key}.timeout_s {reward.timeout_s:g} s{each} + {REWARD_MARGIN_S:g} s",
    )


def start_timeout_s(config: JobConfig) -> float:
    """How long a new actor may take to be ready: the learner's start-up deadline."""
    return config.learner.timeout_s + DEADLINE_MARGIN_S


def learner_bundles(config: JobConfig) -> list[dict[str, float]]:
    """One bundle per learner rank: its CPUs and GPU share, plus, colocated on GPUs, those of
    the generators that share its GPU (generator i goes to bundle ``i % num_ranks``)."""
    learner, generators = config.learner, config.generators
    bundles = [
        {"CPU": learner.cpus_per_rank, "GPU": learner.num_gpus} for _ in range(learner.num_ranks)
    ]
    if config.colocated_on_gpus:
        for index in range(generators.num_actors):
            bundle = bundles[index % learner.num_ranks]
            bundle["CPU"] += generators.num_cpus
            bundle["GPU"] += generators.num_gpus
    return bundles


def rank_env_vars(config: JobConfig) -> dict[str, str]:
    """The learner ranks' environment. Colocated, torch's OpenMP threads share the cores with
    other processes: ``OMP_WAIT_POLICY=PASSIVE`` makes an idle thread sleep instead of spinning,
    without which a step on 2 busy cores took 15-20 s instead of 0.3 s (the demo's PPO step);
    the driver's own ``OMP_WAIT_POLICY`` wins."""
    if config.placement != "colocated":
        return {}
    return {"OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def generator_config(config: JobConfig) -> GeneratorConfig:
    """The generators' section with its engine dtype resolved (``generators.dtype``, else the
    learner's)."""
    return config.generators.model_copy(update={"dtype": config.generator_dtype})


class Layout:
    """Where the job's learner ranks and generators go: the learner's placement group is made
    on first use (by the learner or by a generator that shares its GPU). ``weight_sync``: the
    job's resolved ``weight_sync``, that the learner and every generator are made with."""

    def __init__(self, config: JobConfig, weight_sync: WeightSyncConfig) -> None:
        self.config = config
        self.weight_sync = weight_sync
        self._placement: Any = None
        self.env_actors: list[Any] = []
        self.endpoint_token = secrets.token_hex(32)
        """The secret of this job's agent endpoints (actors/endpoint.py): session keys derive
        from it, and it never leaves the job's processes."""
        """The environment actors started so far, which every generator is given (Ray restarts
        a dead one behind the same handle)."""

    @property
    def placement(self) -> Any:
        """The learner's placement group; a new one when it was removed (a learner start that
        failed removes it, ``start_learner_group``): a restart placed in a removed one would
        fail with Ray's ``Placement group ... does not exist``."""
        if self._placement is None or placement_removed(self._placement):
            self._placement = create_placement(learner_bundles(self.config))
        return self._placement

    def start_learner(self) -> LearnerGroup:
        """The learner's ranks, started in the placement group (not waited for)."""
        from rlfleet.learner.actor import LearnerActor, LearnerSettings

        config = self.config
        settings = LearnerSettings.from_job(config, self.weight_sync, seeded_trainer_config(config))
        # A thread of its own answers the driver's liveness pings while a step runs.
        rank_cls = ray.remote(concurrency_groups=LIVENESS_GROUPS)(LearnerActor)

        def create(spec: Any, strategy: Any) -> Any:
            return rank_cls.options(
                num_cpus=config.learner.cpus_per_rank,
                num_gpus=config.learner.num_gpus,
                scheduling_strategy=strategy,
                runtime_env={"env_vars": rank_env_vars(config)},
            ).remote(settings, spec)

        learner = config.learner
        return start_learner_group(
            create, self.placement, learner.num_ranks, learner.timeout_s, learner.liveness_timeout_s
        )

    def start_generator(self, index: int) -> Any:
        """Generator ``index``; colocated on GPUs, in the bundle of the rank whose GPU it
        shares."""
        from rlfleet.actors.generator import RemoteGenerator, generator_options

        config = self.config
        options: dict[str, Any] = generator_options(config.generators)
        if config.colocated_on_gpus:
            bundle = index % config.learner.num_ranks
            options["scheduling_strategy"] = in_bundle(self.placement, bundle)
        return RemoteGenerator.options(**options).remote(
            index,
            config.model,
            generator_config(config),
            config.seed,
            config.name,
            config.metrics,
            self.weight_sync,
            trust_remote_code=config.trust_remote_code,
            env=self.env_setup(),
            asynchronous=config.mode == "async",
        )

    def start_env(self, index: int) -> Any:
        """Environment actor ``index`` (started before the generators, which are given it)."""
        from rlfleet.envs.actor import EnvActor, env_actor_options

        actor = (
            ray.remote(EnvActor)
            .options(**env_actor_options(self.config.env))
            .remote(index, self.config.env)
        )
        del self.env_actors[index:]
        self.env_actors.append(actor)
        return actor

    def env_setup(self) -> Any:
        """What a generator of a multi-turn job runs its trajectories with (None: no ``env:``)."""
        if self.config.env is None:
            return None
        from rlfleet.actors.trajectories import EnvSetup
        from rlfleet.envs.loading import tool_schemas_of

        return EnvSetup(
            self.config.env,
            list(self.env_actors),
            tool_schemas_of(self.config.env),
            self.endpoint_token if self.config.env.agent else None,
        )


def placement_removed(placement: Any) -> bool:
    """Whether Ray removed ``placement`` (a placement group)."""
    return ray.util.placement_group_table(placement).get("state") == "REMOVED"


def seeded_trainer_config(config: JobConfig) -> PPOConfig | CriticFreeConfig:
    """The learner trainer's config (``ppo`` or ``critic_free``, as ``algorithm`` says), seeded
    by the job's seed unless the section gives its own ``seed``."""
    trainer_config = config.trainer_config
    if "seed" in trainer_config.model_fields_set:
        return trainer_config
    return trainer_config.model_copy(update={"seed": config.seed})
