"""The job driver's Prometheus metrics, and every metric set of a job.

The driver serves ``JobMetrics`` and writes the discovery file of the whole job
(``common/metrics.py``), so it is the one place that knows each role's set (``METRIC_SETS``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import ray
from prometheus_client import Counter, Gauge, Histogram

from rlfleet.actors.metrics import GeneratorMetrics
from rlfleet.common import waits
from rlfleet.common.config import JobConfig
from rlfleet.common.metrics import (
    LATENCY_BUCKETS,
    ROLE_LABELS,
    MetricSet,
    check_non_negative,
    file_sd_owners,
    file_sd_path,
    remove_orphaned_file_sd,
    remove_own_file_sd,
    write_file_sd,
)
from rlfleet.common.processes import owner_tag
from rlfleet.job.rollout_stats import COUNTED, FINISH_REASONS, TrajectorySummary
from rlfleet.learner.metrics import LearnerMetrics
from rlfleet.reward.metrics import RewardMetrics

logger = logging.getLogger(__name__)

ACTOR_ROLES = ("generator", "reward", "learner")
STAGES = ("generate", "score", "train", "sync")
"""The parts of an iteration that the job times (the ``time/<stage>_s`` keys of stats.jsonl)."""

EVAL_GAUGES = {
    "eval/reward_mean": "Mean reward of the latest held-out evaluation.",
    "eval/reward_std": "Standard deviation of the rewards of the latest held-out evaluation.",
    "eval/reward_max_mean": "Mean over eval prompts of their best sample's reward (eval.n > 1).",
    "eval/response_length_mean": "Mean response length (tokens) of the latest evaluation.",
    "eval/samples": "Samples of the latest held-out evaluation.",
    "eval/policy_version": "Policy version the latest held-out evaluation sampled with.",
    "eval/iteration": "Iteration after which the latest held-out evaluation ran (0: at start).",
}
"""The eval stats (stats.jsonl's ``eval/*`` keys) each served as gauge
``rlfleet_job_eval_<name>``; NaN before the first evaluation."""

EVAL_COMPONENT_PREFIX = "eval/reward/"


def check_role(role: str) -> None:
    if role not in ACTOR_ROLES:
        raise ValueError(f"actor role must be one of {ACTOR_ROLES}, got {role!r}")


class JobMetrics(MetricSet):
    """The job driver's view: end-to-end throughput, stages, actor health, checkpoints."""

    role = "job"

    def __init__(self, job: str, index: int = 0) -> None:
        super().__init__(job, index)
        self._samples = self._counter("rlfleet_job_samples_total", "Samples trained on.")
        self._prompts = self._counter(
            "rlfleet_job_prompts_total",
            "Prompts trained on (samples / generators.n_samples_per_prompt).",
        )
        self._tokens = self._counter(
            "rlfleet_job_tokens_total", "Response tokens of the samples trained on."
        )
        stage_seconds = Histogram(
            "rlfleet_job_stage_seconds",
            "Seconds per iteration spent in each stage (generate, score, train, sync).",
            (*ROLE_LABELS, "stage"),
            registry=self.registry,
            buckets=LATENCY_BUCKETS,
        )
        self._stages = self._per_value(stage_seconds, "stage", STAGES)
        self._inflight = self._gauge(
            "rlfleet_job_inflight_rollouts", "Rollouts dispatched and not yet trained on."
        )
        alive = Gauge(
            "rlfleet_job_actors_alive",
            "Actors alive, per actor role.",
            (*ROLE_LABELS, "actor_role"),
            registry=self.registry,
        )
        self._alive = self._per_value(alive, "actor_role", ACTOR_ROLES)
        restarts = Counter(
            "rlfleet_job_actor_restarts_total",
            "Actor restarts, per actor role (a learner restart replaces all its ranks: one).",
            (*ROLE_LABELS, "actor_role"),
            registry=self.registry,
        )
        self._restarts = self._per_value(restarts, "actor_role", ACTOR_ROLES)
        self._checkpoint = self._histogram(
            "rlfleet_job_checkpoint_seconds", "Seconds to save a checkpoint."
        )
        self._eval = {
            key: self._gauge(f"rlfleet_job_{key.replace('/', '_')}", documentation)
            for key, documentation in EVAL_GAUGES.items()
        }
        for gauge in self._eval.values():
            gauge.set(float("nan"))
        self._env = EnvMetrics(self)
        self._eval_components = Gauge(
            "rlfleet_job_eval_reward_component_mean",
            "Mean of each reward component in the latest held-out evaluation.",
            (*ROLE_LABELS, "component"),
            registry=self.registry,
        )

    def record_iteration(
        self, samples: int, tokens: int, stage_seconds: Mapping[str, float]
    ) -> None:
        """One iteration trained on ``samples`` with ``tokens`` response tokens; stage_seconds
        maps stages (``STAGES``; any subset) to the seconds spent in them."""
        check_non_negative("samples", samples)
        check_non_negative("tokens", tokens)
        for stage, seconds in stage_seconds.items():
            if stage not in STAGES:
                raise ValueError(f"unknown stage {stage!r}; stages are {STAGES}")
            check_non_negative(f"stage_seconds[{stage!r}]", seconds)
        self._samples.inc(samples)
        self._tokens.inc(tokens)
        for stage, seconds in stage_seconds.items():
            self._stages[stage].observe(seconds)

    def record_prompts(self, prompts: int) -> None:
        """An iteration's samples came from ``prompts`` prompts (groups)."""
        check_non_negative("prompts", prompts)
        self._prompts.inc(prompts)

    def set_inflight_rollouts(self, count: int) -> None:
        check_non_negative("count", count)
        self._inflight.set(count)

    def set_actors_alive(self, role: str, count: int) -> None:
        check_role(role)
        check_non_negative("count", count)
        self._alive[role].set(count)

    def record_actor_restart(self, role: str) -> None:
        check_role(role)
        self._restarts[role].inc()

    def record_checkpoint(self, seconds: float) -> None:
        check_non_negative("seconds", seconds)
        self._checkpoint.observe(seconds)

    def record_trajectories(self, summary: TrajectorySummary) -> None:
        """A multi-turn iteration's trajectories: turns, environment latency, tool calls and
        errors, how they ended, the share of observation tokens."""
        self._env.record(summary)

    def record_eval(self, iteration: int, stats: Mapping[str, float]) -> None:
        """The held-out evaluation after ``iteration``: its ``eval/*`` stats (those of
        ``EVAL_GAUGES`` and each ``eval/reward/<component>_mean``; others are left out)."""
        check_non_negative("iteration", iteration)
        self._eval["eval/iteration"].set(iteration)
        for key, value in stats.items():
            if key in self._eval:
                self._eval[key].set(value)
            elif key.startswith(EVAL_COMPONENT_PREFIX) and key.endswith("_mean"):
                component = key.removeprefix(EVAL_COMPONENT_PREFIX).removesuffix("_mean")
                self._eval_components.labels(**self.labels, component=component).set(value)


class EnvMetrics:
    """A multi-turn job's trajectory metrics, served by the driver (``JobMetrics``)."""

    def __init__(self, owner: JobMetrics) -> None:
        labels, registry = ROLE_LABELS, owner.registry
        self._labels = owner.labels
        self.turns = Histogram(
            "rlfleet_job_env_turns",
            "Model turns per trajectory.",
            labels,
            registry=registry,
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
        )
        self.step_seconds = Histogram(
            "rlfleet_job_env_step_seconds",
            "Seconds per environment reset or step.",
            labels,
            registry=registry,
            buckets=LATENCY_BUCKETS,
        )
        self.tool_calls = Counter(
            "rlfleet_job_env_tool_calls_total",
            "Tool calls, per tool.",
            (*labels, "tool"),
            registry=registry,
        )
        self.tool_errors = Counter(
            "rlfleet_job_env_tool_errors_total",
            "Tool calls that failed (bad arguments, the tool raised), per tool.",
            (*labels, "tool"),
            registry=registry,
        )
        self.finished = Counter(
            "rlfleet_job_env_trajectories_total",
            "Trajectories, per finish reason (stop, length: cut by the token budget, "
            "max_turns, env_timeout, env_error; agent_error, agent_timeout, agent_no_calls: "
            "dropped agent trajectories, not trained).",
            (*labels, "finish_reason"),
            registry=registry,
        )
        self.events = Counter(
            "rlfleet_job_env_events_total",
            "Malformed tool calls, truncated observations, template re-render mismatches, "
            "trajectory restarts (a dead environment actor), agent endpoint calls and the calls "
            "left out of split agent trajectories.",
            (*labels, "event"),
            registry=registry,
        )
        self.masked = Gauge(
            "rlfleet_job_env_masked_token_fraction",
            "Share of the latest iteration's response tokens that are observations (loss mask 0).",
            labels,
            registry=registry,
        )
        for reason in FINISH_REASONS:
            self.finished.labels(**self._labels, finish_reason=reason)
        for event in COUNTED:
            self.events.labels(**self._labels, event=event)

    def record(self, summary: TrajectorySummary) -> None:
        labels = self._labels
        for turns in summary.turns:
            self.turns.labels(**labels).observe(turns)
        for seconds in summary.step_seconds:
            self.step_seconds.labels(**labels).observe(seconds)
        for tool, n in summary.tool_calls.items():
            self.tool_calls.labels(**labels, tool=tool).inc(n)
        for tool, n in summary.tool_errors.items():
            self.tool_errors.labels(**labels, tool=tool).inc(n)
        for reason, n in summary.finish_reasons.items():
            self.finished.labels(**labels, finish_reason=reason).inc(n)
        for event, n in summary.counters.items():
            self.events.labels(**labels, event=event).inc(n)
        self.masked.labels(**labels).set(summary.masked_tokens / max(summary.tokens, 1))


METRIC_SETS: tuple[type[MetricSet], ...] = (
    GeneratorMetrics,
    RewardMetrics,
    LearnerMetrics,
    JobMetrics,
)


METRICS_TARGET_TIMEOUT_S = 30.0
"""How long the driver waits for new actors to say where they serve their metrics (they are idle
then: just started, or restarted); one that does not answer is asked again at the next update."""


class MetricsTargets:
    """The job's Prometheus file_sd file (common/metrics.py): where the driver and every actor
    serve their metrics, labelled with this driver's host and pid. Nothing when metrics are
    disabled."""

    def __init__(self, config: JobConfig) -> None:
        self.enabled = config.metrics.enabled
        self.path = file_sd_path(config.name, config.metrics.file_sd_dir)
        self.name = config.name
        self.cached: dict[Any, Any] = {}
        """Each actor's metrics endpoint (an actor's never changes), by actor handle."""

    def publish(self, targets: list[Any], actors: list[Any]) -> None:
        """Writes ``targets`` (the driver's and the learner's; None for none) and each of
        ``actors``' endpoint, asked once per actor, to the file. The files of killed drivers of
        this host go first."""
        remove_orphaned_file_sd(self.path.parent)
        others = file_sd_owners(self.path) - {owner_tag()}
        if others:
            logger.warning(
                "%s was written by another driver of a job named %r (%s): both jobs now report "
                "under that name; give one of them another name",
                self.path,
                self.name,
                ", ".join(sorted(others)),
            )
        known = {actor: self.cached[actor] for actor in actors if actor in self.cached}
        asked = {actor.metrics_target.remote(): actor for actor in actors if actor not in known}
        answered, _ = waits.wait(list(asked), time.monotonic() + METRICS_TARGET_TIMEOUT_S)
        for ref in answered:
            try:
                known[asked[ref]] = ray.get(ref)
            except ray.exceptions.RayActorError:
                continue  # a dead actor is listed again once its pool has restarted it
        self.cached = known
        targets = [*targets, *(known[actor] for actor in actors if actor in known)]
        write_file_sd(self.path, [t for t in targets if t is not None], owner=owner_tag())

    def remove(self) -> None:
        """Tells Prometheus to forget the job's endpoints (unless another job of the same name
        wrote the file since)."""
        if self.enabled:
            remove_own_file_sd(self.path, owner_tag())
