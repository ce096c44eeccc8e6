"""Chaos benchmark: the chaos job of tests/job/test_chaos.py (tests/support/chaos.py: tiny model,
2 HF-engine generators, 2 reward actors, a checkpoint every 3 iterations) run ``--runs`` times,
each with its own random SIGKILLs:

- generators (``--generator-kills`` a run) and reward actors (``--reward-kills``) as a batch goes
  out to them (``on_dispatch``, as in the test);
- learner rank 0 (``--learner-kills``, the kinds in turn): ``dispatch``, as a batch goes out to
  the reward actors; ``sync``, mid weight-sync: in the sync after an iteration, a random delay
  into one of its parts (the learner's ranks gathering and putting the weights, or the
  generators loading them), within the longest such part seen so far; ``anytime``, a random
  delay after a batch goes
  out to the generators, within an iteration's time (it lands wherever the job then is:
  sampling, scoring, training, syncing, checkpointing or restarting).

Each run reports whether it completed, whether every rollout id was trained exactly once (the
learner's consumed ids against the ids the driver produced: no duplicates, none missing for the
iterations trained, none it never produced; and stats.jsonl's lines), the kills of each kind
(a learner kill with the stage of the loop it landed in) and its wall time; then a summary::

    K of N runs completed with every rollout id trained once

    .venv/bin/python bench/chaos.py --runs 10 [--seed 0] [--iterations 30] [--out chaos.json]

Runs one after another on one local Ray instance (4 logical CPUs, as the tests' ``ray_local``).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see tests/conftest.py
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.chaos import (  # noqa: E402
    SAMPLES,
    Killer,
    chaos_job,
    exactly_once,
    sigkill,
    trained_ids,
)
from support.job_configs import read_stats  # noqa: E402

from rlfleet.common.errors import error_line  # noqa: E402
from rlfleet.job.loop import TrainingJob  # noqa: E402
from rlfleet.job.stages import InFlight  # noqa: E402
from rlfleet.job.sync import needs_sync  # noqa: E402

LEARNER_KILL_KINDS = ("dispatch", "sync", "anytime")
SYNC_KILL_POINTS = ("publish", "load")
"""The parts of a weight sync a ``sync`` kill lands in: while the learner's ranks gather and put
the weights, or while the generators load them (their owner then dies under them)."""


@dataclass
class Plan:
    """One run's kills: ``dispatch[(pool, iteration)]`` the victim killed as that iteration's
    batch goes out to that pool (``support.chaos.Killer``); ``sync``: iterations whose weight sync
    learner rank 0 dies in; ``anytime``: iterations whose generator dispatch starts a timer that
    kills learner rank 0."""

    dispatch: dict[tuple[str, int], str]
    sync: set[int]
    anytime: set[int]

    @classmethod
    def draw(cls, rng: random.Random, iterations: int, args: argparse.Namespace) -> Plan:
        """Dispatch keys are the driver's iteration when a batch goes out: the batch is trained
        in the next one (0..iterations-1); a sync follows the training of iteration
        1..iterations."""
        batches = range(iterations)
        dispatch: dict[tuple[str, int], str] = {}
        for i in rng.sample(batches, args.generator_kills):
            dispatch[("generator", i)] = "generator"
        for i in rng.sample(batches, args.reward_kills):
            dispatch[("reward", i)] = "reward"
        kinds = [LEARNER_KILL_KINDS[n % 3] for n in range(args.learner_kills)]
        learner_at = rng.sample(range(1, iterations), len(kinds))
        sync, anytime = set(), set()
        for kind, i in zip(kinds, learner_at, strict=True):
            if kind == "dispatch":
                dispatch[("reward", i)] = "learner"  # replaces a reward kill there, if any
            elif kind == "sync":
                sync.add(i)
            else:
                anytime.add(i)
        return cls(dispatch, sync, anytime)


@dataclass
class LearnerKill:
    kind: str
    """``dispatch``, ``sync`` or ``anytime``."""
    iteration: int
    stage: str
    """Where the loop was when rank 0 died (``ChaosJob.stage``)."""
    delay_s: float = 0.0


class ChaosJob(TrainingJob):
    """The job, telling which stage of the loop it is in (``stage``), recording every rollout
    id it sends out (``produced``) and killing learner rank 0 on timers as ``plan`` says."""

    def __init__(self, config: Any, plan: Plan, rng: random.Random, killer: Killer) -> None:
        self.plan = plan
        self.rng = rng
        self.stage = "start-up"
        self.produced: list[int] = []
        self.learner_kills: list[LearnerKill] = []
        self.missed_kills: list[str] = []
        self.timers: list[threading.Timer] = []
        self.sync_kill: str | None = None
        """Where in the next sync learner rank 0 dies (``SYNC_KILL_POINTS``), if it does."""
        self.part_seconds: dict[str, list[float]] = {part: [0.01] for part in SYNC_KILL_POINTS}
        """How long each part of a sync took, each time."""
        self._part_started = 0.0
        self.dispatched_at: list[float] = []
        self._lock = threading.Lock()
        super().__init__(config, on_dispatch=killer)

    # -- stages ------------------------------------------------------------------------------

    def dispatch_next_batch(self, prompts: int | None = None) -> InFlight:
        self.stage = "dispatch"
        if self.iteration in self.plan.anytime:
            self.plan.anytime.discard(self.iteration)
            self._kill_later("anytime", self.rng.uniform(0.0, self.iteration_seconds()))
        self.dispatched_at.append(time.monotonic())
        in_flight = super().dispatch_next_batch(prompts)
        self.produced.extend(in_flight.batch.column("rollout_id").to_pylist())
        self.stage = "generate"
        return in_flight

    def score(self, rollouts: Any) -> Any:
        self.stage = "score"
        scored = super().score(rollouts)
        self.stage = "train"  # the learner's step comes next
        return scored

    def sync_weights_if_needed(self) -> None:
        config = self.config
        due = needs_sync(
            self.iteration, self.sync.version, config.max_policy_lag, config.one_step_off
        )
        if due and self.iteration in self.plan.sync:
            self.plan.sync.discard(self.iteration)
            self.sync_kill = self.rng.choice(SYNC_KILL_POINTS)
        self.stage = "sync"
        super().sync_weights_if_needed()
        self._sync_done()
        self.stage = "report"

    def start_learner(self) -> Any:
        """The learner, its ``publish_weights`` watched: the stage of a sync (``sync:publish``
        while the ranks gather and put the weights, ``sync:load`` while the generators load
        them) and, when ``sync_kill`` says so, a timer that kills rank 0 a random delay into
        that part of the sync (within the longest such part seen so far)."""
        learner = super().start_learner()
        call, publish = learner.call, learner.publish_weights

        def watched_call(method: str, *args: Any) -> Any:
            pending = call(method, *args)
            if method == "publish_weights":
                self.stage, self._part_started = "sync:publish", time.monotonic()
                self._kill_in_sync("publish")
            return pending

        def watched_publish() -> Any:
            handle = publish()
            self.part_seconds["publish"].append(time.monotonic() - self._part_started)
            self.stage, self._part_started = "sync:load", time.monotonic()
            self._kill_in_sync("load")
            return handle

        learner.call, learner.publish_weights = watched_call, watched_publish
        return learner

    def _sync_done(self) -> None:
        """The end of a sync's ``load`` part (``WeightSync.publish`` returned)."""
        if self.stage == "sync:load":
            self.part_seconds["load"].append(time.monotonic() - self._part_started)

    def _kill_in_sync(self, part: str) -> None:
        if self.sync_kill == part:
            self.sync_kill = None
            self._kill_later("sync", self.rng.uniform(0.0, max(self.part_seconds[part])))

    def save_checkpoint(self, cursor: dict[str, Any]) -> None:
        self.stage = "checkpoint"
        super().save_checkpoint(cursor)
        self.stage = "report"

    def restart_learner(self, failure: Any) -> None:
        self.stage = "learner restart"
        super().restart_learner(failure)
        self._sync_done()

    # -- the learner's timed kills -------------------------------------------------------------

    def iteration_seconds(self) -> float:
        """The median time between two generator dispatches so far (1.5 s before there are
        two)."""
        times = self.dispatched_at
        gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
        return statistics.median(gaps) if gaps else 1.5

    def _kill_later(self, kind: str, delay_s: float) -> None:
        iteration = self.iteration
        timer = threading.Timer(delay_s, self._kill_learner, (kind, iteration, delay_s))
        timer.daemon = True
        self.timers.append(timer)
        timer.start()

    def _kill_learner(self, kind: str, iteration: int, delay_s: float) -> None:
        with self._lock:
            stage = self.stage
            if sigkill(self.learner.ranks[0]):
                self.learner_kills.append(LearnerKill(kind, iteration, stage, round(delay_s, 3)))
            else:
                self.missed_kills.append(f"{kind} at iteration {iteration} ({stage})")

    def stop_timers(self) -> None:
        for timer in self.timers:
            timer.cancel()


@dataclass
class RunReport:
    run: int
    completed: bool
    exactly_once: bool
    wall_s: float
    iterations_trained: int
    kills: dict[str, int]
    learner_kills: list[dict[str, Any]] = field(default_factory=list)
    missed_kills: list[str] = field(default_factory=list)
    restarts: dict[str, int] = field(default_factory=dict)
    duplicates: list[int] = field(default_factory=list)
    missing: list[int] = field(default_factory=list)
    unexpected: list[int] = field(default_factory=list)
    stats_problem: str | None = None
    error: str | None = None

    def line(self) -> str:
        learner = ", ".join(
            f"{k['kind']}@{k['iteration']}:{k['stage']}" for k in self.learner_kills
        )
        once = (
            "yes"
            if self.exactly_once
            else (
                f"NO (duplicates {self.duplicates[:8]}, missing {self.missing[:8]}, unexpected "
                f"{self.unexpected[:8]}{', ' + self.stats_problem if self.stats_problem else ''})"
            )
        )
        return (
            f"run {self.run}: {'completed' if self.completed else 'FAILED'} "
            f"in {self.wall_s:.1f} s, "
            f"{self.iterations_trained} iterations; every rollout id trained once: {once}; kills: "
            f"generator {self.kills.get('generator', 0)}, reward {self.kills.get('reward', 0)}, "
            f"learner {self.kills.get('learner', 0)} [{learner}]"
            + (f"; missed {self.missed_kills}" if self.missed_kills else "")
            + f"; restarts {self.restarts}"
            + (f"; error: {self.error}" if self.error else "")
        )


def stats_problem(stats: list[dict[str, Any]], iterations: int) -> str | None:
    """What is wrong with a completed run's stats.jsonl: each iteration once, in order, each
    with ``SAMPLES`` rollouts, the ids 0.. in order."""
    if [line["iteration"] for line in stats] != list(range(1, iterations + 1)):
        return f"stats.jsonl iterations {[line['iteration'] for line in stats]}"
    if trained_ids(stats) != list(range(SAMPLES * iterations)):
        return "stats.jsonl rollout ids are not 0.. in order"
    return None


def one_run(run: int, model_dir: Path, scratch: Path, args: argparse.Namespace) -> RunReport:
    rng = random.Random(args.seed * 1000 + run)
    plan = Plan.draw(rng, args.iterations, args)
    out, checkpoints = scratch / f"run-{run}", scratch / f"checkpoints-{run}"
    config = chaos_job(
        model_dir,
        out,
        checkpoints,
        iterations=args.iterations,
        learner={"max_restarts": args.learner_kills + 3},
    )
    killer = Killer(dict(plan.dispatch))
    started = time.monotonic()
    job = ChaosJob(config, plan, rng, killer)
    killer.job = job
    completed, error, consumed, result = False, None, [], None
    try:
        result = job.train()
        completed = True
        consumed = result.consumed_rollout_ids
    except Exception as exc:  # noqa: BLE001 - a failed run is reported, the next one runs
        error = error_line(exc)
        try:
            consumed = job.learner.consumed_rollout_ids()
        except Exception:  # noqa: BLE001 - the learner may be dead: nothing to compare
            consumed = []
    finally:
        job.stop_timers()
        job.shutdown()
    wall_s = time.monotonic() - started

    stats = read_stats(out) if (out / "stats.jsonl").exists() else []
    trained = len({line["iteration"] for line in stats})
    check = exactly_once(
        consumed, job.produced, args.iterations if completed else len(consumed) // SAMPLES
    )
    problem = stats_problem(stats, args.iterations) if completed else None
    if completed and len(consumed) != SAMPLES * args.iterations:
        problem = f"{len(consumed)} ids consumed, {SAMPLES * args.iterations} expected"
    kills = Counter(victim for victim, _ in killer.killed)
    kills["learner"] += len(job.learner_kills)
    dispatch_learner = [
        LearnerKill("dispatch", i, "score") for victim, i in killer.killed if victim == "learner"
    ]
    missed = job.missed_kills + [f"{v} at dispatch {k}" for k, v in killer.plan.items()]
    missed += [f"sync at iteration {i} (not reached)" for i in sorted(plan.sync)]
    missed += [f"anytime at iteration {i} (not reached)" for i in sorted(plan.anytime)]
    restarts = {}
    if result is not None:
        restarts = {
            "generator": result.generator_restarts,
            "reward": result.reward_restarts,
            "learner": result.learner_restarts,
        }
    return RunReport(
        run=run,
        completed=completed,
        exactly_once=completed and check.ok and problem is None,
        wall_s=round(wall_s, 1),
        iterations_trained=trained,
        kills=dict(kills),
        learner_kills=[asdict(k) for k in dispatch_learner + job.learner_kills],
        missed_kills=missed,
        restarts=restarts,
        duplicates=check.duplicates,
        missing=check.missing,
        unexpected=check.unexpected,
        stats_problem=problem,
        error=error,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument(
        "--seed", type=int, default=0, help="run i draws its kills from seed*1000+i"
    )
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--generator-kills", type=int, default=6)
    parser.add_argument("--reward-kills", type=int, default=2)
    parser.add_argument("--learner-kills", type=int, default=4)
    parser.add_argument("--out", help="also write the reports as JSON here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")

    import ray

    from rlfleet.job.cluster import use_loopback_only
    from rlfleet.tasks.tiny_model import build_tiny_model

    scratch = Path(tempfile.mkdtemp(prefix="bench-chaos-"))
    os.environ["TMPDIR"] = str(scratch)  # short paths for the actors' sockets, as the test
    tempfile.tempdir = None
    model_dir = build_tiny_model(scratch / "tiny-model")
    use_loopback_only()  # as a local job's Ray
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    reports = []
    try:
        for run in range(args.runs):
            report = one_run(run, model_dir, scratch, args)
            reports.append(report)
            print(report.line(), flush=True)
    finally:
        ray.shutdown()
    good = sum(report.exactly_once for report in reports)
    walls = [report.wall_s for report in reports]
    print(
        f"{good} of {len(reports)} runs completed with every rollout id trained once "
        f"(wall time per run: median {statistics.median(walls):.1f} s, "
        f"{min(walls):.1f}..{max(walls):.1f} s)",
        flush=True,
    )
    if args.out:
        Path(args.out).write_text(json.dumps([asdict(r) for r in reports], indent=1))


if __name__ == "__main__":
    main()
