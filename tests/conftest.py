"""Fixtures shared by the whole suite: a tiny model built offline, a local Ray instance.

``OMP_WAIT_POLICY=PASSIVE`` (set before anything imports torch, whose OpenMP reads it once):
torch's idle OpenMP threads sleep instead of spinning. On the shared 2-core machines, spinning
threads took the CPU from the one doing the work: two PPO steps of the tiny model took 43 s
with 2 threads and 0.9 s with 1; passive, 0.2 s with 2. The thread count, and so every float32
result, stays what it was; spawned ranks, Ray workers and vLLM inherit the setting.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

pytest_plugins = ["support.s3_server", "support.prometheus_server"]

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight tiny GPT-2 with its byte-level BPE tokenizer, built once per session."""
    from rlfleet.tasks.tiny_model import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def arithmetic_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The GRPO example's starting policy (``rlfleet tiny-model DIR --task arithmetic``, seed 0),
    pretrained once per session (about 50 s)."""
    from rlfleet.tasks.tiny_model import pretrain_arithmetic_model

    return pretrain_arithmetic_model(tmp_path_factory.mktemp("arithmetic-model"))


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory: pytest.TempPathFactory):
    """A real local Ray instance (4 logical CPUs on the 2-core machines) shared by the session,
    on loopback only, as a local job's."""
    import ray

    from rlfleet.job.cluster import use_loopback_only

    use_loopback_only()
    tests = str(Path(__file__).resolve().parent)  # support.* for the actors (environments)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Starts the forkserver of tests/support/spawned.py when a collected module uses it: its
    imports then run beside the first tests instead of in front of the first multi-rank one."""
    spawned = sys.modules.get("support.spawned")
    if spawned is not None:
        spawned.start_forkserver()
