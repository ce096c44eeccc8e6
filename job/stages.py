"""The pieces of the loop's iterations that are not the loop: batches in flight, the stage
timer, checkpoint timing, the job's result, the progress bar's KL, and DAPO's sampling control
on scored batches (the overlong penalty, dynamic sampling's group selection)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from rlfleet.algorithms.sampling import (
    dynamic_sampling_keep,
    fill_batch,
    metric_values,
    overlong_penalty,
)
from rlfleet.common.config import CheckpointConfig, JobConfig
from rlfleet.common.sampling_config import DynamicSamplingConfig
from rlfleet.common.schema import concat_batches, with_columns
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


def with_overlong_penalty(scored: pa.RecordBatch, config: JobConfig) -> pa.RecordBatch:
    """The scores with DAPO's soft overlong punishment added (``overlong_penalty``), each
    response's length counted as veRL counts it: every token after the prompt."""
    shaping = config.overlong_penalty
    if shaping is None:
        return scored
    lengths = [len(ids) for ids in scored.column("response_ids").to_pylist()]
    penalty = overlong_penalty(
        lengths, config.response_budget[1], shaping.buffer_len, shaping.penalty_factor
    )
    scores = np.asarray(scored.column("score").to_pylist(), dtype=np.float32)
    return with_columns(scored, score=(scores + penalty.numpy()).tolist())


@dataclass
class GroupSelection:
    """A batch's groups split by dynamic sampling: the rows of the groups kept, in order, and the
    rollout ids of the groups dropped (all samples scored alike) or left over."""

    kept: pa.RecordBatch
    dropped_ids: list[int]

    @classmethod
    def of(cls, scored: pa.RecordBatch, metric: str) -> GroupSelection:
        columns = scored.select(["group_id", "rollout_id", "score", "score_components"]).to_pydict()
        components = [dict(parts) if parts else None for parts in columns["score_components"]]
        values = metric_values(columns["score"], components, metric)
        split = dynamic_sampling_keep(columns["group_id"], values)
        return cls(rows_of_groups(scored, split.kept), ids_of_groups(columns, split.dropped))

    def add(self, other: GroupSelection) -> GroupSelection:
        return GroupSelection(
            concat_batches([self.kept, other.kept]), self.dropped_ids + other.dropped_ids
        )

    def trimmed(self, groups: int) -> GroupSelection:
        """The first ``groups`` kept groups; the rest count as dropped (never trained)."""
        order = list(dict.fromkeys(self.kept.column("group_id").to_pylist()))
        fill = fill_batch(order, groups)
        columns = self.kept.select(["group_id", "rollout_id"]).to_pydict()
        return GroupSelection(
            rows_of_groups(self.kept, fill.batch),
            self.dropped_ids + ids_of_groups(columns, fill.surplus),
        )

    @property
    def groups(self) -> int:
        return len(set(self.kept.column("group_id").to_pylist()))


def rows_of_groups(batch: pa.RecordBatch, groups: tuple[int, ...]) -> pa.RecordBatch:
    mask = pc.is_in(batch.column("group_id"), pa.array(groups, type=pa.int64()))
    return batch.filter(mask)


def ids_of_groups(columns: dict[str, list[Any]], groups: tuple[int, ...]) -> list[int]:
    chosen = set(groups)
    return [
        rid
        for rid, gid in zip(columns["rollout_id"], columns["group_id"], strict=True)
        if gid in chosen
    ]


def fill_with_varied_groups(
    scored: pa.RecordBatch,
    spec: DynamicSamplingConfig,
    target: int,
    sample_more: Callable[[int], pa.RecordBatch],
) -> tuple[pa.RecordBatch, dict[str, Any]]:
    """Dynamic sampling: drops the groups whose samples all scored alike and has
    ``sample_more(prompts)`` sample and score more prompts (twice as many as groups are
    missing) until ``target`` groups differ, at most ``spec.max_rounds`` rounds; the first ones
    make the batch. Dropped and left-over ids are recorded, never trained and never sampled
    again (the cursor has moved past them)."""
    selection, rounds = GroupSelection.of(scored, spec.metric), 1
    while selection.groups < target:
        if rounds >= spec.max_rounds:
            raise RuntimeError(
                f"dynamic_sampling.max_rounds: after {rounds} rounds only {selection.groups} of "
                f"{target} prompts had samples that scored differently; raise max_rounds, "
                "sample more per prompt, or drop dynamic_sampling"
            )
        more = sample_more(2 * (target - selection.groups))
        selection, rounds = selection.add(GroupSelection.of(more, spec.metric)), rounds + 1
    selection = selection.trimmed(target)
    return selection.kept, {
        "dynamic_sampling/rounds": rounds,
        "dynamic_sampling/dropped_samples": len(selection.dropped_ids),
        "dynamic_sampling/dropped_rollout_ids": sorted(selection.dropped_ids),
    }
