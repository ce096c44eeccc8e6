"""Chaos on a real job, shared by tests/job/test_chaos.py and bench/chaos.py: the job (local Ray,
HF-engine generators, the sentiment reward, a real learner, a checkpoint every 3 iterations),
actors killed with SIGKILL as a batch goes out, and the check that every rollout id the driver
produced was trained exactly once."""

from __future__ import annotations

import os
import signal
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from rlfleet.common.config import JobConfig
from support.job_configs import small_job

ITERATIONS = 30
SAMPLES = 8
"""Rollouts per iteration (``small_job``'s batch)."""


def chaos_job(model_dir: Path, out: Path, checkpoints: Path, **fields: Any) -> JobConfig:
    """The chaos job: ``ITERATIONS`` iterations of ``SAMPLES`` rollouts, 2 HF-engine generators,
    2 reward actors, a checkpoint every 3 iterations under ``checkpoints``, metrics off;
    ``fields`` as ``small_job`` takes them."""
    return small_job(
        model_dir,
        out,
        **{
            "iterations": ITERATIONS,
            "generators": {"num_actors": 2, "engine": "hf"},
            "reward": {"num_actors": 2},
            "checkpoint": {"uri": str(checkpoints), "every": 3},
            "metrics": {"enabled": False},
            **fields,
        },
    )


def sigkill(actor: Any) -> bool:
    """Kills ``actor``'s process with SIGKILL (a local Ray instance: this machine's process, as
    Ray's actor table names it), or with ``ray.kill`` when the table knows no process for it;
    False when the actor was not alive (already dead, or not started yet)."""
    from ray._private.state import actors

    info = actors(actor_id=actor._actor_id.hex())
    if info.get("State") != "ALIVE":
        return False
    pid = info.get("Pid")
    if not pid:
        ray.kill(actor, no_restart=True)
        return True
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return False
    return True


@dataclass
class Killer:
    """The job's ``on_dispatch`` hook: ``plan[(kind, iteration)]`` names the victim (``generator``,
    ``reward`` or ``learner``) to kill when that iteration's batch goes to the ``kind`` pool:
    generator or reward actor ``iteration % pool size``, or learner rank 0 of ``job`` (set once
    the job exists). Each planned victim is killed once (a batch trained again after the
    learner's restore goes out again with the same iteration); ``killed`` lists ``(victim,
    iteration + 1)`` of each kill made (the iteration that batch is trained in)."""

    plan: dict[tuple[str, int], str]
    job: Any = None
    killed: list[tuple[str, int]] = field(default_factory=list)

    def __call__(self, kind: str, iteration: int, actors: list[Any]) -> None:
        victim = self.plan.pop((kind, iteration), None)
        if victim is None:
            return
        actor = (
            self.job.learner.ranks[0] if victim == "learner" else actors[iteration % len(actors)]
        )
        if sigkill(actor):
            self.killed.append((victim, iteration + 1))


def trained_ids(stats: list[dict[str, Any]]) -> list[int]:
    """The rollout ids of each stats.jsonl line's range, in line order."""
    return [i for line in stats for i in range(line["rollout_ids"][0], line["rollout_ids"][1] + 1)]


@dataclass(frozen=True)
class ExactlyOnce:
    """How the rollout ids the learner consumed compare with those the driver produced."""

    duplicates: list[int]
    """Ids the learner consumed more than once."""
    missing: list[int]
    """Ids produced for the iterations trained that the learner did not consume."""
    unexpected: list[int]
    """Ids consumed that the driver never produced."""

    @property
    def ok(self) -> bool:
        return not (self.duplicates or self.missing or self.unexpected)


def exactly_once(consumed: list[int], produced: list[int], iterations: int) -> ExactlyOnce:
    """``consumed``: the learner's ledger; ``produced``: every id the driver sent out (a batch
    sent again after a restore repeats its ids); ``iterations``: the iterations trained, whose
    ids (the first ``iterations * SAMPLES`` produced) must all be consumed."""
    counts = Counter(consumed)
    wanted = sorted(set(produced))[: iterations * SAMPLES]
    return ExactlyOnce(
        duplicates=sorted(i for i, n in counts.items() if n > 1),
        missing=sorted(set(wanted) - set(counts)),
        unexpected=sorted(set(counts) - set(produced)),
    )
