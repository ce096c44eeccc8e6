"""Prometheus metrics of every rlfleet process, and how Prometheus finds them.

Each process owns one metric set with its own registry: a generator actor ``GeneratorMetrics``,
a reward actor ``RewardMetrics``, the learner actor ``LearnerMetrics``, the job driver
``JobMetrics``. A set serves its registry on an HTTP endpoint (``serve``) and describes it as a
``MetricsTarget``; the driver collects the targets of all its actors and writes them, with its
own, into one Prometheus ``file_sd`` file (``write_file_sd``) that the shipped scrape configs in
``deploy/prometheus/`` read. Every sample carries the labels ``job``, ``role`` and ``index``; the
scrape configs set ``honor_labels: true`` so that Prometheus keeps them.

Why endpoints plus file_sd rather than Ray's metrics export (``ray.util.metrics``): Ray renames
application metrics to ``ray_<name>`` (so no ``rlfleet_`` names), adds its own labels, ships
them through each node's metrics agent on a 10 s report interval, and writes its discovery file
only when the Ray dashboard runs. An endpoint bound to the node's address (``MetricsConfig.host``
``0.0.0.0`` on a cluster, advertised as the node IP) is reachable from the Prometheus on the head
node whatever node the actor runs on, and the driver, which knows every actor, is the one place
that can say which endpoints belong to a job.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from rlfleet.common.config import MetricsConfig

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
"""Seconds: from a tiny CPU model's generate call to a large model's checkpoint."""
REWARD_BUCKETS = (-10, -5, -2, -1, -0.5, -0.25, 0, 0.25, 0.5, 1, 2, 5, 10)
ROLE_LABELS = ("job", "role", "index")
ACTOR_ROLES = ("generator", "reward", "learner")
STAGES = ("generate", "score", "train", "sync")
"""The parts of an iteration that the job times (the ``time/<stage>_s`` keys of stats.jsonl)."""
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
DEFAULT_FILE_SD_DIR = "/tmp/rlfleet/prometheus"
"""Where job drivers write ``<job>.json`` and the shipped Prometheus configs look."""
JOB_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

PPO_STAT_GAUGES = {
    "objective/kl": ("rlfleet_learner_kl", "Mean KL(policy || reference) per sequence."),
    "objective/kl_coef": ("rlfleet_learner_kl_coef", "KL penalty coefficient (beta)."),
    "ppo/loss/policy": ("rlfleet_learner_policy_loss", "Clipped policy loss of the last step."),
    "ppo/loss/value": ("rlfleet_learner_value_loss", "Clipped value loss of the last step."),
    "ppo/loss/total": ("rlfleet_learner_total_loss", "Policy loss + vf_coef * value loss."),
    "ppo/policy/clipfrac": ("rlfleet_learner_clipfrac", "Fraction of clipped policy ratios."),
    "ppo/policy/entropy": ("rlfleet_learner_entropy", "Mean policy entropy per token."),
    "ppo/policy/approxkl": ("rlfleet_learner_approxkl", "Approximate KL(old || new policy)."),
    "ppo/val/clipfrac": ("rlfleet_learner_value_clipfrac", "Fraction of clipped value updates."),
    "ppo/mean_scores": ("rlfleet_learner_mean_reward", "Mean reward of the batch."),
    "ppo/std_scores": ("rlfleet_learner_std_reward", "Std of the batch's scores."),
}
"""PPO stats keys (TRL names) -> (gauge name, help) set by ``LearnerMetrics.record_step``."""


def check_non_negative(name: str, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")


def check_role(role: str) -> None:
    if role not in ACTOR_ROLES:
        raise ValueError(f"actor role must be one of {ACTOR_ROLES}, got {role!r}")


def advertised_host(bind_host: str) -> str:
    """The address Prometheus should scrape: the node's IP when bound to every interface."""
    if bind_host in WILDCARD_HOSTS:
        import ray.util

        return ray.util.get_node_ip_address()
    return bind_host


class MetricsServer:
    """One registry served over HTTP (``/metrics``) from a daemon thread."""

    def __init__(self, registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0):
        self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        self.host = advertised_host(host)
        self.port: int = self._httpd.server_port

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


def serve_metrics(
    registry: CollectorRegistry, host: str = "127.0.0.1", port: int = 0
) -> MetricsServer:
    """Serve ``registry`` on ``host:port`` (port 0: a free port); read the address off the
    returned server's ``host`` and ``port``."""
    return MetricsServer(registry, host, port)


@dataclass(frozen=True)
class MetricsTarget:
    """Where one process serves its metrics, and the labels that identify it."""

    host: str
    port: int
    job: str
    role: str
    index: int

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def labels(self) -> dict[str, str]:
        return {"job": self.job, "role": self.role, "index": str(self.index)}


def file_sd_groups(targets: Iterable[MetricsTarget]) -> list[dict[str, Any]]:
    """Prometheus file_sd target groups, one per target; a process listed twice is an error."""
    targets = list(targets)
    seen: dict[tuple[str, ...], MetricsTarget] = {}
    for target in targets:
        for key in ((target.address,), (target.job, target.role, str(target.index))):
            if key in seen:
                raise ValueError(f"two metrics targets share {key}: {seen[key]} and {target}")
            seen[key] = target
    return [{"targets": [target.address], "labels": target.labels} for target in targets]


def file_sd_path(job: str, directory: str | os.PathLike[str] = DEFAULT_FILE_SD_DIR) -> Path:
    """The job's discovery file, ``<directory>/<job>.json``."""
    if not JOB_FILE_NAME.fullmatch(job):
        raise ValueError(f"job name {job!r} must match {JOB_FILE_NAME.pattern} to name a file")
    return Path(directory) / f"{job}.json"


def write_file_sd(path: str | os.PathLike[str], targets: Iterable[MetricsTarget]) -> Path:
    """Write the targets as a Prometheus file_sd JSON file, atomically (Prometheus reloads the
    file whenever it changes and must never read half of it). Readable by all, so that a
    Prometheus running as its own user can read it."""
    path = Path(path)
    content = json.dumps(file_sd_groups(targets), indent=2) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(content)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


MetricSetT = TypeVar("MetricSetT", bound="MetricSet")


class MetricSet:
    """The metrics of one process (``role`` and ``index`` within ``job``), in its own registry.

    Recording works whether or not the set is served, so ``MetricsConfig.enabled = False`` only
    means not calling ``serve``.
    """

    role: ClassVar[str]

    def __init__(self, job: str, index: int = 0) -> None:
        if not job:
            raise ValueError("job must be a non-empty name")
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        self.job = job
        self.index = index
        self.registry = CollectorRegistry()
        self._server: MetricsServer | None = None

    @classmethod
    def from_config(
        cls: type[MetricSetT], job: str, index: int, config: MetricsConfig
    ) -> MetricSetT:
        """The set of one process, served on ``config.host`` when ``config.enabled``."""
        metrics = cls(job, index)
        if config.enabled:
            metrics.serve(config.host)
        return metrics

    @property
    def labels(self) -> dict[str, str]:
        return {"job": self.job, "role": self.role, "index": str(self.index)}

    def serve(self, host: str = "127.0.0.1", port: int = 0) -> MetricsTarget:
        """Start the HTTP endpoint (once; later calls return the same target)."""
        if self._server is None:
            self._server = serve_metrics(self.registry, host, port)
        return self.target

    @property
    def target(self) -> MetricsTarget:
        if self._server is None:
            raise RuntimeError(f"{type(self).__name__} is not served: call serve() first")
        return MetricsTarget(self._server.host, self._server.port, self.job, self.role, self.index)

    @property
    def served_target(self) -> MetricsTarget | None:
        """The target while served, else None (what an actor reports with metrics disabled)."""
        return self.target if self._server is not None else None

    def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def _counter(self, name: str, documentation: str) -> Counter:
        return Counter(name, documentation, ROLE_LABELS, registry=self.registry).labels(
            **self.labels
        )

    def _gauge(self, name: str, documentation: str) -> Gauge:
        return Gauge(name, documentation, ROLE_LABELS, registry=self.registry).labels(**self.labels)

    def _histogram(
        self, name: str, documentation: str, buckets: Sequence[float] = LATENCY_BUCKETS
    ) -> Histogram:
        return Histogram(
            name, documentation, ROLE_LABELS, registry=self.registry, buckets=buckets
        ).labels(**self.labels)

    def _per_value(self, metric: Any, label: str, values: Iterable[str]) -> dict[str, Any]:
        """One child of ``metric`` per value of ``label``, created now so that every series
        exists (at zero) from the first scrape."""
        return {value: metric.labels(**self.labels, **{label: value}) for value in values}


class GeneratorMetrics(MetricSet):
    role = "generator"

    def __init__(self, job: str, index: int = 0) -> None:
        super().__init__(job, index)
        self._rollouts = self._counter("rlfleet_generator_rollouts_total", "Rollouts generated.")
        self._tokens = self._counter("rlfleet_generator_tokens_total", "Response tokens generated.")
        self._latency = self._histogram(
            "rlfleet_generator_generation_seconds", "Seconds per generate call."
        )
        self._version = self._gauge(
            "rlfleet_generator_policy_version", "Policy version the generator samples with."
        )
        self._weight_load = self._histogram(
            "rlfleet_generator_weight_load_seconds", "Seconds to load new weights in place."
        )
        self._busy = self._gauge("rlfleet_generator_busy", "1 while generating, 0 while idle.")

    def record_generation(self, rollouts: int, tokens: int, seconds: float) -> None:
        """One generate call: ``rollouts`` responses with ``tokens`` response tokens in all."""
        check_non_negative("rollouts", rollouts)
        check_non_negative("tokens", tokens)
        check_non_negative("seconds", seconds)
        self._rollouts.inc(rollouts)
        self._tokens.inc(tokens)
        self._latency.observe(seconds)

    def set_policy_version(self, version: int) -> None:
        self._version.set(version)

    def record_weight_load(self, seconds: float, version: int) -> None:
        """Weights of ``version`` loaded in place in ``seconds``; the generator now holds it."""
        check_non_negative("seconds", seconds)
        self._weight_load.observe(seconds)
        self._version.set(version)

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Marks the generator busy for the duration of the block."""
        self._busy.set(1)
        try:
            yield
        finally:
            self._busy.set(0)


class RewardMetrics(MetricSet):
    role = "reward"

    def __init__(
        self, job: str, index: int = 0, reward_buckets: Sequence[float] = REWARD_BUCKETS
    ) -> None:
        super().__init__(job, index)
        self._samples = self._counter("rlfleet_reward_samples_total", "Samples scored.")
        self._latency = self._histogram(
            "rlfleet_reward_scoring_seconds", "Seconds per scoring call."
        )
        # With negative buckets the client exposes no _sum (a sum that can fall is no counter):
        # the mean reward is the learner's rlfleet_learner_mean_reward.
        self._values = self._histogram(
            "rlfleet_reward_value", "Distribution of the rewards given.", reward_buckets
        )
        self._errors = self._counter(
            "rlfleet_reward_errors_total", "Scoring calls that failed with an error."
        )
        self._timeouts = self._counter(
            "rlfleet_reward_timeouts_total", "Scoring calls that ran past reward.timeout_s."
        )

    def record_scores(self, scores: Sequence[float], seconds: float) -> None:
        """One scoring call that gave ``scores`` (one per sample) in ``seconds``."""
        check_non_negative("seconds", seconds)
        for i, score in enumerate(scores):
            if not math.isfinite(score):
                raise ValueError(f"score of sample {i} is {score!r}: rewards must be finite")
        self._samples.inc(len(scores))
        self._latency.observe(seconds)
        for score in scores:
            self._values.observe(score)

    def record_error(self) -> None:
        self._errors.inc()

    def record_timeout(self) -> None:
        self._timeouts.inc()


class LearnerMetrics(MetricSet):
    role = "learner"

    def __init__(self, job: str, index: int = 0) -> None:
        super().__init__(job, index)
        self._step = self._histogram("rlfleet_learner_step_seconds", "Seconds per PPO step.")
        self._stats = {
            key: self._gauge(name, f"{documentation} (PPO stat {key})")
            for key, (name, documentation) in PPO_STAT_GAUGES.items()
        }
        self._iteration = self._gauge("rlfleet_learner_iteration", "PPO steps taken.")
        self._version = self._gauge(
            "rlfleet_learner_policy_version", "Latest policy version published."
        )
        self._broadcast = self._histogram(
            "rlfleet_learner_weight_broadcast_seconds", "Seconds to publish new weights."
        )
        self._broadcast_bytes = self._gauge(
            "rlfleet_learner_weight_broadcast_bytes", "Size of the last weights published."
        )

    def record_step(self, stats: Mapping[str, Any], seconds: float, iteration: int) -> None:
        """One PPO step: sets a gauge per ``PPO_STAT_GAUGES`` key of ``stats`` (numbers, numpy
        or torch scalars; every key is required so that no gauge silently stays at zero)."""
        check_non_negative("seconds", seconds)
        missing = [key for key in PPO_STAT_GAUGES if key not in stats]
        if missing:
            raise ValueError(f"PPO stats lack {missing}")
        values = {key: self._scalar(key, stats[key]) for key in PPO_STAT_GAUGES}
        for key, value in values.items():
            self._stats[key].set(value)
        self._step.observe(seconds)
        self._iteration.set(iteration)

    @staticmethod
    def _scalar(key: str, value: Any) -> float:
        try:
            return float(value)
        except (TypeError, ValueError) as error:
            raise ValueError(f"PPO stat {key!r} must be a single number, got {value!r}") from error

    def set_policy_version(self, version: int) -> None:
        self._version.set(version)

    def record_weight_broadcast(self, seconds: float, nbytes: int, version: int) -> None:
        """Weights of ``version`` (``nbytes`` in all) published in ``seconds``."""
        check_non_negative("seconds", seconds)
        check_non_negative("nbytes", nbytes)
        self._broadcast.observe(seconds)
        self._broadcast_bytes.set(nbytes)
        self._version.set(version)


class JobMetrics(MetricSet):
    """The job driver's view: end-to-end throughput, stages, actor health, checkpoints."""

    role = "job"

    def __init__(self, job: str, index: int = 0) -> None:
        super().__init__(job, index)
        self._samples = self._counter("rlfleet_job_samples_total", "Samples trained on.")
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
            "Actor restarts, per actor role.",
            (*ROLE_LABELS, "actor_role"),
            registry=self.registry,
        )
        self._restarts = self._per_value(restarts, "actor_role", ACTOR_ROLES)
        self._checkpoint = self._histogram(
            "rlfleet_job_checkpoint_seconds", "Seconds to save a checkpoint."
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


METRIC_SETS: tuple[type[MetricSet], ...] = (
    GeneratorMetrics,
    RewardMetrics,
    LearnerMetrics,
    JobMetrics,
)
