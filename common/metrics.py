"""Prometheus metrics of rlfleet processes, and how Prometheus finds them.

Each process owns one metric set (a ``MetricSet`` subclass beside its role:
``actors/metrics.py``, ``reward/metrics.py``, ``learner/metrics.py``,
``job/metrics.py``) with its own registry. A set serves its registry on an HTTP
endpoint (``serve``) and describes it as a ``MetricsTarget``; the driver collects the targets of
all its actors and writes them, with its own, into one Prometheus ``file_sd`` file
(``write_file_sd``) that the shipped scrape configs in ``deploy/prometheus/`` read. Every sample
carries the labels ``job``, ``role`` and ``index``; the scrape configs set ``honor_labels: true``
so that Prometheus keeps them.

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
import os
import re
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from rlfleet.common.config import MetricsConfig
from rlfleet.common.processes import owner_gone

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
"""Seconds: from a tiny CPU model's generate call to a large model's checkpoint."""
ROLE_LABELS = ("job", "role", "index")
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
DEFAULT_FILE_SD_DIR = "/tmp/rlfleet/prometheus"
"""Where job drivers write ``<job>.json`` and the shipped Prometheus configs look."""
JOB_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
OWNER_LABEL = "__rlfleet_owner"
"""The file_sd label naming the driver (``<host>:<pid>``) that wrote a group: files of a driver
that is gone (killed: it could not remove its file) are removed by the next job that starts on
its host (``remove_orphaned_file_sd``). Prometheus drops ``__`` labels after relabelling, so no
series carries it."""


def check_non_negative(name: str, value: float) -> None:
    if not value >= 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")


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


def file_sd_groups(
    targets: Iterable[MetricsTarget], owner: str | None = None
) -> list[dict[str, Any]]:
    """Prometheus file_sd target groups, one per target, labelled with their ``owner`` (see
    ``OWNER_LABEL``) when given; a process listed twice is an error."""
    targets = list(targets)
    seen: dict[tuple[str, ...], MetricsTarget] = {}
    for target in targets:
        for key in ((target.address,), (target.job, target.role, str(target.index))):
            if key in seen:
                raise ValueError(f"two metrics targets share {key}: {seen[key]} and {target}")
            seen[key] = target
    extra = {OWNER_LABEL: owner} if owner else {}
    return [
        {"targets": [target.address], "labels": {**target.labels, **extra}} for target in targets
    ]


def file_sd_path(job: str, directory: str | os.PathLike[str] = DEFAULT_FILE_SD_DIR) -> Path:
    """The job's discovery file, ``<directory>/<job>.json``."""
    if not JOB_FILE_NAME.fullmatch(job):
        raise ValueError(f"job name {job!r} must match {JOB_FILE_NAME.pattern} to name a file")
    return Path(directory) / f"{job}.json"


def write_file_sd(
    path: str | os.PathLike[str], targets: Iterable[MetricsTarget], owner: str | None = None
) -> Path:
    """Write the targets as a Prometheus file_sd JSON file, atomically (Prometheus reloads the
    file whenever it changes and must never read half of it), each labelled with ``owner``
    when given. Readable by all, so that a Prometheus running as its own user can read it."""
    path = Path(path)
    content = json.dumps(file_sd_groups(targets, owner), indent=2) + "\n"
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


def file_sd_owners(path: str | os.PathLike[str]) -> set[str]:
    """The drivers (``OWNER_LABEL``) that wrote the file_sd file at ``path``; none when it is
    missing, unreadable or has a group without an owner."""
    try:
        groups = json.loads(Path(path).read_text())
        return {group["labels"][OWNER_LABEL] for group in groups}
    except (OSError, ValueError, TypeError, KeyError):
        return set()


def remove_orphaned_file_sd(directory: str | os.PathLike[str]) -> list[Path]:
    """Removes the file_sd files in ``directory`` written by a driver of this host that is gone
    (their ``OWNER_LABEL``); returns them. Files of other hosts, without an owner, or that
    cannot be read are left alone."""
    removed = []
    for path in Path(directory).glob("*.json"):
        owners = file_sd_owners(path)
        if owners and all(map(owner_gone, owners)):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def remove_own_file_sd(path: str | os.PathLike[str], owner: str) -> None:
    """Removes the file_sd file at ``path`` unless another driver wrote it last (a job of the
    same name started meanwhile: its file stays)."""
    if file_sd_owners(path) <= {owner}:
        Path(path).unlink(missing_ok=True)


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
