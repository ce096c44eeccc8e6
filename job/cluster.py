"""Ray set-up for a job: join a cluster, or start a local instance big enough for its actors.

A local instance whose driver was killed (SIGKILL, OOM) leaves two Ray processes behind, the
dashboard agent and the runtime-env agent: orphans that hold their ports (random ones, so no
later start clashes with them) and memory until they notice that their raylet is gone, 65 s
after the kill on the 2-core test machine. The rest of the instance (GCS, raylet, workers,
actors) is gone within 6 s. A job that starts its own instance stops such orphans first
(``stop_orphaned_ray_agents``).

Joining a cluster: ``ray.init`` retries an address that nothing answers at without end, in C++,
where neither SIGTERM nor Ctrl-C reach the driver. So a ``host:port`` address is first tried
with plain TCP connections for at most ``CONNECT_TIMEOUT_S`` (``RayUnreachable`` names it after
that), in short tries between which a stop signal takes effect.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import socket
import tempfile
import time
from pathlib import Path

import ray

from rlfleet.common.config import JobConfig
from rlfleet.common.processes import process_alive

logger = logging.getLogger(__name__)


def required_cpus(config: JobConfig) -> float:
    """Logical CPUs that the job's actors reserve together."""
    return (
        config.learner.num_ranks * config.learner.cpus_per_rank
        + config.generators.num_actors * config.generators.num_cpus
        + config.reward.num_actors * config.reward.num_cpus
        + (config.env.num_actors * config.env.num_cpus if config.env else 0.0)
    )


CONNECT_TIMEOUT_S = 30.0
"""How long a job tries to reach the Ray cluster at ``ray_address`` (or ``RAY_ADDRESS``)."""


class RayUnreachable(ConnectionError):
    """Nothing answers at the Ray address the job is to join."""


def init_ray(config: JobConfig) -> None:
    """Joins ``ray_address`` or the cluster of a submitted job (RAY_ADDRESS is set there); else
    starts a local in-process instance with enough logical CPUs for every actor, reachable on
    loopback only. Never auto-detects another cluster on this machine. An address that nothing
    answers at within ``CONNECT_TIMEOUT_S`` raises ``RayUnreachable``."""
    if ray.is_initialized():
        return
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if config.ray_address:
        check_reachable(config.ray_address, "ray_address")
        ray.init(address=config.ray_address)
    elif os.environ.get("RAY_ADDRESS"):
        check_reachable(os.environ["RAY_ADDRESS"], "RAY_ADDRESS")
        ray.init(address="auto")
    else:
        num_cpus = max(os.cpu_count() or 1, math.ceil(required_cpus(config)))
        stop_orphaned_ray_agents(Path(tempfile.gettempdir()) / "ray")
        use_loopback_only()
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            _node_ip_address=LOOPBACK,
        )


def actor_start_milestones() -> list[tuple[float, str]]:
    """When each actor's constructor began and ended so far (wall-clock seconds, a milestone
    such as ``RemoteGenerator.__init__ began (worker 3f2a)``), from Ray's task events; for the
    start-up trace (common/startup_trace.py)."""
    milestones = []
    for event in ray.timeline():
        if event.get("name") != "__init__" or not str(event.get("cat", "")).startswith("task::"):
            continue
        actor = event["cat"].removeprefix("task::").removesuffix(".__init__")
        worker = str(event.get("tid", "")).removeprefix("worker:")[:4]
        began = float(event["ts"]) / 1e6
        milestones.append((began, f"{actor}.__init__ began (worker {worker})"))
        milestones.append(
            (began + float(event["dur"]) / 1e6, f"{actor}.__init__ ended (worker {worker})")
        )
    return milestones


def check_reachable(address: str, key: str, timeout_s: float | None = None) -> None:
    """Raises ``RayUnreachable`` (naming ``key``, where the address came from) unless something
    accepts a TCP connection at ``address`` (``host:port``; Ray's other forms, ``auto``,
    ``local``, ``ray://...`` and ``http://...``, are left to ``ray.init``) within ``timeout_s``.
    Tries every second, each try at most a second, so that a stop signal is not held up.
    ``timeout_s`` None: ``CONNECT_TIMEOUT_S``."""
    timeout_s = CONNECT_TIMEOUT_S if timeout_s is None else timeout_s
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        return
    host = host.strip("[]")
    hosts = {host}
    if host in ("127.0.0.1", "localhost", "::1"):  # Ray itself connects to the node's address
        hosts.add(ray.util.get_node_ip_address())
    deadline = time.monotonic() + timeout_s
    while True:
        for candidate in hosts:
            try:
                with socket.create_connection((candidate, int(port)), timeout=1.0):
                    return
            except OSError:
                pass
        left = deadline - time.monotonic()
        if left <= 0:
            raise RayUnreachable(
                f"{key}: nothing answers at {address} within {timeout_s:g} s; check the address "
                "(the head node's GCS, host:port, by default port 6379) and that the Ray "
                "cluster is up (ray status on the head node)"
            )
        time.sleep(min(1.0, left))


LOOPBACK = "127.0.0.1"


def use_loopback_only() -> None:
    """Makes a local Ray instance bind its GCS, raylet, agents and workers to 127.0.0.1 instead
    of every interface.

    Ray binds to loopback only when the node's IP is 127.0.0.1, and it replaces 127.0.0.1 by
    the machine's outward IP unless ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` is off: that variable
    is read once, when ``ray._private.ray_constants`` is imported, so it is set for the
    processes Ray starts and its value in this (already importing) process is set too.
    """
    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


RAYLET_PID_VARIABLE = b"RAY_RAYLET_PID="
"""Set in the environment of every process a raylet starts (its agents, its workers)."""


def stop_orphaned_ray_agents(ray_temp_dir: Path) -> list[int]:
    """Stops (SIGKILL) this user's processes started by a raylet that is gone, when they write
    their logs under ``ray_temp_dir`` (the Ray temp dir a local instance of this job uses):
    what a killed driver's local instance left (see the module's docstring). Returns their
    pids. Nothing on a system without ``/proc``."""
    stopped = []
    for process in Path("/proc").glob("[0-9]*"):
        try:
            if not raylet_gone(process) or not logs_under(process, ray_temp_dir):
                continue
            os.kill(int(process.name), signal.SIGKILL)
        except (OSError, ValueError):
            continue  # gone meanwhile, or another user's
        stopped.append(int(process.name))
    if stopped:
        logger.warning("stopped Ray processes %s left by a killed job's Ray instance", stopped)
    return stopped


def raylet_gone(process: Path) -> bool:
    """Whether ``/proc/<pid>`` is a process that a raylet started and that raylet is gone."""
    environ = (process / "environ").read_bytes().split(b"\0")
    raylet = next((v for v in environ if v.startswith(RAYLET_PID_VARIABLE)), None)
    return raylet is not None and not process_alive(int(raylet[len(RAYLET_PID_VARIABLE) :]))


def logs_under(process: Path, directory: Path) -> bool:
    """Whether ``/proc/<pid>`` has a file under ``directory`` open."""
    prefix = f"{directory.resolve()}/"
    return any(os.readlink(fd).startswith(prefix) for fd in (process / "fd").iterdir())
