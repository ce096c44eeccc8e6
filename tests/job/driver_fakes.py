"""Fake learner, generator and reward actors with the real ones' Ray interface (learner/actor.py,
actors/generator.py, reward/actor.py), for the driver's fast tests: batches in the rollout
schema of common/schema.py, no model.

Ray pickles this module's classes by value (``register_pickle_by_value``): actor processes
cannot import it (``tests/`` is not on their path).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
import ray.cloudpickle

from rlfleet.common.config import CheckpointConfig, JobConfig
from rlfleet.common.metrics import MetricsTarget
from rlfleet.common.schema import prompt_batch, with_columns
from rlfleet.common.transport import WeightLoadError
from rlfleet.common.waits import LIVENESS_GROUPS
from rlfleet.job.roles import ActorFactories
from rlfleet.learner.rank_group import LearnerGroup

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

LEARNER_STATS = {
    "objective/kl": 0.5,
    "objective/kl_coef": 0.2,
    "ppo/loss/policy": -0.1,
    "ppo/loss/value": 0.3,
    "rollout/logprob_diff_mean": 0.0,
    "time/ppo/total": 1.0,
    "env/reward_mean": 0.0,
}
"""What the fake learner's step returns: stats.jsonl keeps objective/, ppo/ and rollout/."""

CRITIC_FREE_LEARNER_STATS = {
    "critic_free/loss": 0.1,
    "critic_free/kl": 0.02,
    "critic_free/reward/mean": 1.0,
    "rollout/logprob_diff_mean": 0.0,
    "rollout/tis_capped_fraction": 0.0,
    "time/grpo/total": 1.0,
}
"""The fake learner's step stats in a critic-free job: stats.jsonl keeps critic_free/ too."""


@dataclass(frozen=True)
class FakeWeights:
    """A published policy version (the real handles come from common/transport/); ``ref``: an
    object the publishing learner rank owns (``FakeLearner(..., publish_objects=True)``), that
    a generator fetches to load the weights, as through the object store."""

    version: int
    nbytes: int = 0
    ref: Any = None


def process_id(actor: Any) -> int:
    """For ``actor.__ray_call__.remote(process_id)``: the actor's process id."""
    return os.getpid()


def prompts(n: int, first_id: int = 0) -> pa.RecordBatch:
    """A prompt batch of rollout ids ``first_id ..``."""
    ids = range(first_id, first_id + n)
    return prompt_batch(list(ids), [f"p{i}" for i in ids], [[1, 2]] * n)


def fake_target(job: str, role: str, index: int) -> MetricsTarget:
    """A metrics endpoint that names the actor's process (each restart gets a new one)."""
    return MetricsTarget(f"{role}-{os.getpid()}.invalid", 9000, job, role, index)


@ray.remote(num_cpus=0, concurrency_groups=LIVENESS_GROUPS)
class FakeLearner:
    """Trains nothing; checks rollout ids and policy lag as the real learner does, counts
    versions, keeps checkpoints as ``<uri>/step-<version>.json``; answers liveness pings as the
    real one does (job/roles.py). With ``publish_objects`` its weights are an object it owns;
    with ``fail_start`` its constructor raises that error."""

    def __init__(
        self,
        job: str,
        max_policy_lag: int,
        metrics: bool,
        stats: dict[str, float],
        publish_objects: bool = False,
        fail_start: BaseException | None = None,
    ):
        if fail_start is not None:
            raise fail_start
        self.job = job
        self.max_policy_lag = max_policy_lag
        self.metrics = metrics
        self.stats = stats
        self.publish_objects = publish_objects
        self.version = 0
        self.consumed: list[int] = []
        self.published: list[int] = []
        self.groups: list[dict[int, list[int]]] = []

    def ready(self) -> int:
        return self.version

    def metrics_target(self) -> MetricsTarget | None:
        return fake_target(self.job, "learner", 0) if self.metrics else None

    def step(self, batch: pa.RecordBatch) -> dict[str, float]:
        ids = batch.column("rollout_id").to_pylist()
        if set(ids) & set(self.consumed) or len(set(ids)) != len(ids):
            raise ValueError(f"rollouts {ids} were already consumed")
        for version in batch.column("policy_version").to_pylist():
            if self.version - version > self.max_policy_lag:
                raise ValueError(f"sampled with {version}, learner at {self.version}")
        if None in batch.column("score").to_pylist():
            raise ValueError("unscored rollouts")
        groups: dict[int, list[int]] = {}
        for rollout_id, group_id in zip(ids, batch.column("group_id").to_pylist(), strict=True):
            groups.setdefault(group_id, []).append(rollout_id)
        self.groups.append(groups)
        self.consumed.extend(ids)
        self.version += 1
        return dict(self.stats)

    def trained_groups(self) -> list[dict[int, list[int]]]:
        """For each step, the rollout ids of each group id it trained on."""
        return list(self.groups)

    def publish_weights(self) -> FakeWeights:
        self.published.append(self.version)
        ref = [ray.put(self.version)] if self.publish_objects else None
        return FakeWeights(self.version, ref=ref)

    def published_versions(self) -> list[int]:
        return list(self.published)

    def consumed_rollout_ids(self) -> list[int]:
        return list(self.consumed)

    def save_checkpoint(self, config: CheckpointConfig, job_state: dict[str, Any]) -> str:
        path = Path(config.uri) / f"step-{self.version:08d}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        learner = {"version": self.version, "consumed": self.consumed}
        path.write_text(json.dumps({**job_state, "learner": learner}))
        return str(path)

    def wait_for_checkpoint(self) -> None:
        return None

    def resolve_checkpoint(self, uri: str, config: CheckpointConfig) -> str:
        """``uri``: one checkpoint file, or the directory whose newest one is meant."""
        path = Path(uri)
        return str(max(path.glob("step-*.json")) if path.is_dir() else path)

    def newest_committed(self, uris: list[str], config: CheckpointConfig) -> str | None:
        """The newest of ``uris`` that is still there."""
        return next((uri for uri in reversed(uris) if Path(uri).is_file()), None)

    def load_checkpoint(self, uri: str, config: CheckpointConfig) -> dict[str, Any]:
        """``uri``: one checkpoint file (as ``resolve_checkpoint`` answered)."""
        state = json.loads(Path(uri).read_text())
        self.version = state["learner"]["version"]
        self.consumed = state["learner"]["consumed"]
        return state


@ray.remote(num_cpus=0)
class FakeGenerator:
    """Answers every prompt with three tokens, sampled with the version it holds; one
    ``stuck`` at a version loads nothing newer; one told to die exits on that ``generate``
    call (1: the first); one given ``fail_start`` raises it in its constructor. Asleep
    (``sleep``, until ``wake_up``) it refuses to generate or load weights."""

    def __init__(
        self,
        job: str,
        index: int,
        metrics: bool,
        stuck: int | None = None,
        die_on_call: int | None = None,
        fail_start: BaseException | None = None,
    ) -> None:
        if fail_start is not None:
            raise fail_start
        self.job = job
        self.index = index
        self.metrics = metrics
        self.stuck = stuck
        self.die_on_call = die_on_call
        self.calls = 0
        self.version = 0
        self.events: list[str] = []

    def ready(self) -> bool:
        return True

    def metrics_target(self) -> MetricsTarget | None:
        return fake_target(self.job, "generator", self.index) if self.metrics else None

    def sleep(self) -> None:
        self.events.append("sleep")

    def wake_up(self) -> None:
        self.events.append("wake_up")

    def history(self) -> list[str]:
        """``sleep``, ``wake_up``, ``load_weights`` and ``generate`` calls in order."""
        return list(self.events)

    def load_weights(self, handle: FakeWeights) -> int:
        """Holds ``handle``'s version; fetches its object first, if it has one, failing as the
        real generator does (a ``WeightLoadError`` around what ``ray.get`` raised)."""
        self._check_awake("load_weights")
        if handle.ref is not None:
            try:
                ray.get(handle.ref[0], timeout=30)
            except Exception as exc:
                raise WeightLoadError(
                    f"generator {self.index}: its fake engine could not load the published "
                    f"weights: {type(exc).__name__}: {exc}"
                ) from exc
        self.version = handle.version if self.stuck is None else self.stuck
        return self.version

    def generate(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        self._check_awake("generate")
        self.calls += 1
        if self.calls == self.die_on_call:
            os._exit(1)
        n = batch.num_rows
        return with_columns(
            batch,
            response=["a b c"] * n,
            response_ids=[[1, 2, 3]] * n,
            response_logprobs=[[-1.0, -1.0, -1.0]] * n,
            finish_reason=["length"] * n,
            policy_version=[self.version] * n,
        )

    def _check_awake(self, call: str) -> None:
        if self.events[-1:] == ["sleep"]:
            raise RuntimeError(f"generator {self.index}: {call} while asleep")
        self.events.append(call)


@ray.remote(num_cpus=0)
class FakeReward:
    """Scores rollout id ``i`` with ``i % 3``; one told to die exits on that ``score`` call; one
    given ``fail_start`` raises it in its constructor."""

    def __init__(
        self,
        job: str,
        index: int,
        metrics: bool,
        die_on_call: int | None = None,
        fail_start: BaseException | None = None,
    ):
        if fail_start is not None:
            raise fail_start
        self.job = job
        self.index = index
        self.metrics = metrics
        self.die_on_call = die_on_call
        self.calls = 0

    def ready(self) -> bool:
        return True

    def metrics_target(self) -> MetricsTarget | None:
        return fake_target(self.job, "reward", self.index) if self.metrics else None

    def score(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        self.calls += 1
        if self.calls == self.die_on_call:
            os._exit(1)
        ids = batch.column("rollout_id").to_pylist()
        return with_columns(batch, score=[float(i % 3) for i in ids])


def fake_factories(
    config: JobConfig,
    die_on_call: dict[tuple[str, int], int] | None = None,
    publish_objects: bool = False,
    fail_start: dict[tuple[str, int], list[BaseException | None]] | None = None,
    starts: Counter[tuple[str, int]] | None = None,
) -> ActorFactories:
    """Starts the fakes for ``config``'s job, ``learner.num_ranks`` fake learner ranks (rank 0
    serves metrics) pinged for liveness as the real ones are; ``die_on_call[(role, index)] = n``:
    the first generator or reward actor ``index`` exits on its n-th call (its replacement does
    not); ``publish_objects``: the learner's weights are objects it owns (see ``FakeWeights``);
    ``fail_start[(role, index)]``: the error the constructor of each start of that actor raises
    in turn (None: none; no more once the list is used up), role ``learner`` with the rank's
    index too. ``starts``, when given, counts the starts of each ``(role, index)``."""
    job, metrics = config.name, config.metrics.enabled
    stats = LEARNER_STATS if config.algorithm == "ppo" else CRITIC_FREE_LEARNER_STATS
    started: Counter[tuple[str, int]] = Counter() if starts is None else starts

    def start(role: str, index: int) -> dict[str, Any]:
        """The start's ``die_on_call`` (its first start only) and ``fail_start``."""
        started[(role, index)] += 1
        count = started[(role, index)]
        failures = (fail_start or {}).get((role, index), [])
        return {
            "die_on_call": (die_on_call or {}).get((role, index)) if count == 1 else None,
            "fail_start": failures[count - 1] if count <= len(failures) else None,
        }

    def learner() -> LearnerGroup:
        ranks = [
            FakeLearner.remote(
                job,
                config.max_policy_lag,
                metrics and rank == 0,
                stats,
                publish_objects,
                start("learner", rank)["fail_start"],
            )
            for rank in range(config.learner.num_ranks)
        ]
        liveness_s = config.learner.liveness_timeout_s
        return LearnerGroup(ranks, config.learner.timeout_s, liveness_timeout_s=liveness_s)

    return ActorFactories(
        learner=learner,
        generator=lambda i: FakeGenerator.remote(job, i, metrics, **start("generator", i)),
        reward=lambda i: FakeReward.remote(job, i, metrics, **start("reward", i)),
    )


@ray.remote(num_cpus=0)
class ShardWorker:
    """A pool member: ``work`` scores each rollout with the worker's index after ``delay_s``;
    with ``die`` it exits on its first call instead; with ``fail_start`` its constructor raises
    that error."""

    def __init__(
        self,
        index: int,
        die: bool = False,
        delay_s: float = 0.0,
        fail_start: BaseException | None = None,
    ) -> None:
        if fail_start is not None:
            raise fail_start
        self.index = index
        self.die = die
        self.delay_s = delay_s
        self.shards: list[list[int]] = []

    def ready(self) -> bool:
        return True

    def work(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        if self.die:
            os._exit(1)
        time.sleep(self.delay_s)
        self.shards.append(batch.column("rollout_id").to_pylist())
        return with_columns(batch, score=[float(self.index)] * batch.num_rows)

    def received(self) -> list[list[int]]:
        """The rollout ids of each shard this worker was sent."""
        return self.shards

    def ping(self) -> int:
        if self.die:
            os._exit(1)
        return self.index


def nap(actor: Any, seconds: float = 5.0) -> float:
    """For ``actor.__ray_call__.remote(nap)``: a call that keeps the actor busy for ``seconds``."""
    time.sleep(seconds)
    return seconds
