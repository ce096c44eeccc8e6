"""Ray set-up: the CPUs a local instance needs for the job's actors, a local instance that
listens on loopback only, and the Ray agents a killed job left behind."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from support.job_configs import small_job

from rlfleet.job.cluster import required_cpus, stop_orphaned_ray_agents


def test_required_cpus_add_up_every_actor(tmp_path: Path) -> None:
    config = small_job(
        tmp_path,
        tmp_path / "run",
        learner={"num_ranks": 2, "num_cpus": 2},
        generators={"num_actors": 3, "num_cpus": 1.5},
        reward={"num_actors": 2, "num_cpus": 0.25},
    )
    assert required_cpus(config) == 2 * 2 + 3 * 1.5 + 2 * 0.25
    unset = config.model_copy(
        update={"learner": config.learner.model_copy(update={"num_cpus": None})}
    )
    assert required_cpus(unset) == 2 * 1 + 3 * 1.5 + 2 * 0.25  # one reserved per rank


LOCAL_JOB_BINDS = """
import json, sys
import psutil, ray
from ray._private import services
from support.job_configs import small_job
from rlfleet.job.cluster import init_ray

init_ray(small_job(sys.argv[1], sys.argv[1] + "/run"))
ray.get(ray.remote(lambda: 1).remote())
me = psutil.Process()
listening = set()
for process in [me, *me.children(recursive=True)]:
    try:
        listening |= {c.laddr.ip for c in process.net_connections("inet") if c.status == "LISTEN"}
    except psutil.Error:
        pass
gcs = ray.get_runtime_context().gcs_address
print(json.dumps([services.get_node_ip_address(), gcs, sorted(listening)]))
ray.shutdown()
"""


@pytest.mark.slow
def test_a_local_ray_instance_listens_on_loopback_only(tmp_path: Path) -> None:
    """Ray started by the job itself (no ray_address, no RAY_ADDRESS): its node IP, the GCS
    address and every listening socket of Ray's processes are 127.0.0.1."""
    tests_dir = Path(__file__).parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    ray_tmp = tempfile.mkdtemp(prefix="rlf-ray-", dir="/tmp")  # short: Ray's socket paths
    env.update(TMPDIR=ray_tmp, PYTHONPATH=str(tests_dir))
    try:
        proc = subprocess.run(
            [sys.executable, "-c", LOCAL_JOB_BINDS, str(tmp_path)],
            capture_output=True,
            text=True,
            env=env,
            timeout=180,
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    node_ip, gcs, listening = json.loads(proc.stdout.strip().splitlines()[-1])
    assert node_ip == "127.0.0.1"
    assert gcs.startswith("127.0.0.1:")
    assert listening and set(listening) <= {"127.0.0.1", "::ffff:127.0.0.1"}


SLEEPER = "import sys, time; log = open(sys.argv[1], 'a'); time.sleep(120)"


def start_sleeper(log: Path, raylet_pid: int) -> subprocess.Popen:
    """A process that looks like a Ray agent: started by raylet ``raylet_pid`` (its environment
    says so), writing its log at ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RAY_RAYLET_PID": str(raylet_pid)}
    process = subprocess.Popen([sys.executable, "-c", SLEEPER, str(log)], env=env)
    deadline = time.monotonic() + 30
    while not any(
        os.readlink(fd).endswith(log.name) for fd in Path(f"/proc/{process.pid}/fd").iterdir()
    ):
        assert time.monotonic() < deadline, "the sleeper did not open its log"
        time.sleep(0.05)
    return process


def test_the_agents_a_killed_jobs_ray_left_are_stopped_and_no_others(tmp_path: Path) -> None:
    """Only a process whose raylet is gone and whose logs are in the job's Ray temp dir."""
    gone = subprocess.Popen(["true"])
    gone.wait()
    ray_dir = tmp_path / "ray"
    orphan = start_sleeper(ray_dir / "session_1" / "logs" / "dashboard_agent.log", gone.pid)
    live_raylet = start_sleeper(ray_dir / "session_2" / "logs" / "agent.log", os.getpid())
    elsewhere = start_sleeper(tmp_path / "other" / "logs" / "agent.log", gone.pid)
    try:
        assert stop_orphaned_ray_agents(ray_dir) == [orphan.pid]
        assert orphan.wait(timeout=10) == -signal.SIGKILL
        assert live_raylet.poll() is None and elsewhere.poll() is None
    finally:
        for process in (orphan, live_raylet, elsewhere):
            process.kill()
            process.wait()
