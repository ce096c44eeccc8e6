"""The pieces of the loop's iterations that are not the loop: batches in flight, the stage
timer, checkpoint timing, the job's result and the progress bar's KL."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from rlfleet.common.config import CheckpointConfig
from rlfleet.job.pool import PendingShards

KL_STATS = ("objective/kl", "critic_free/kl", "critic_free/kl_in_reward")
"""Where a stats line keeps the KL to the reference: PPO's, the critic-free loss's (``beta``),
the critic-free reward's (``kl_coef``). A critic-free job with neither has no reference."""


def reference_kl(stats: dict[str, Any]) -> str:
    """The progress bar's KL: the first of ``KL_STATS`` in ``stats``, ``-`` without one."""
    kl = next((stats[key] for key in KL_STATS if key in stats), None)
    return "-" if kl is None else f"{kl:.3f}"


@dataclass(frozen=True)
class InFlight:
    """A prompt batch out with the generators."""

    batch: pa.RecordBatch
    pending: PendingShards
    cursor_before: dict[str, Any]
    """The prompt cursor before the batch was taken: a checkpoint saved before the batch is
    trained on resumes there, so the resumed job samples it again and skips nothing."""
    dispatch_s: float


class StageTimer:
    """Seconds spent in each stage of one iteration; the one measurement feeds both the stats
    line (``time/<stage>_s``) and ``JobMetrics.record_iteration``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    def stats(self) -> dict[str, float]:
        return {f"time/{name}_s": seconds for name, seconds in self.seconds.items()}


def prompt_count(batch: pa.RecordBatch) -> int:
    """The prompts a batch's samples came from: its distinct group ids."""
    return len(set(batch.column("group_id").to_pylist()))


def checkpoint_due(config: CheckpointConfig, iteration: int, iterations: int) -> bool:
    """Every ``checkpoint.every`` iterations and after the last one, when ``checkpoint.uri`` is
    set."""
    every = config.every or iterations
    return config.uri is not None and (iteration % every == 0 or iteration == iterations)


@dataclass
class JobResult:
    stats: list[dict[str, Any]]
    """This run's lines of stats.jsonl (those after a checkpoint it resumed from)."""
    consumed_rollout_ids: list[int]
    generator_restarts: int
    reward_restarts: int
    learner_restarts: int = 0
