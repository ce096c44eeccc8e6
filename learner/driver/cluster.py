"""Ray set-up for a job: join a cluster, or start a local instance big enough for its actors."""

from __future__ import annotations

import math
import os

import ray

from rlfleet.common.config import JobConfig


def required_cpus(config: JobConfig) -> float:
    """Logical CPUs that the job's actors reserve together."""
    return (
        config.learner.num_ranks * config.learner.cpus_per_rank
        + config.generators.num_actors * config.generators.num_cpus
        + config.reward.num_actors * config.reward.num_cpus
    )


def init_ray(config: JobConfig) -> None:
    """Joins ``ray_address`` or the cluster of a submitted job (RAY_ADDRESS is set there); else
    starts a local in-process instance with enough logical CPUs for every actor, reachable on
    loopback only. Never auto-detects another cluster on this machine."""
    if ray.is_initialized():
        return
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if config.ray_address:
        ray.init(address=config.ray_address)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto")
    else:
        num_cpus = max(os.cpu_count() or 1, math.ceil(required_cpus(config)))
        use_loopback_only()
        ray.init(
            address="local",
            num_cpus=num_cpus,
            include_dashboard=False,
            log_to_driver=False,
            _node_ip_address=LOOPBACK,
        )


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
