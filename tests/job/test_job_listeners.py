"""A whole local job, as ``rlfleet train`` runs it, on the network and under SIGTERM:

- with two learner ranks (their ``torch.distributed`` store and gloo connections) and the
  collective weight transport (the driver's store, every member's gloo connections), every
  socket that any of the job's processes listens on is on 127.0.0.1;
- SIGTERM while the job starts (Ray starting, actors loading) ends it with one line and exit
  status 143, and leaves no process of its Ray instance behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pytest
from support.job_configs import small_job, write_config

LOOPBACK = ("127.0.0.1", "::ffff:127.0.0.1")


def job_command(config_path: Path) -> list[str]:
    main = "import sys; from rlfleet.cli import main; sys.exit(main())"
    return [sys.executable, "-c", main, "train", "--config", str(config_path)]


def job_environment(ray_tmp: str) -> dict[str, str]:
    """The test's environment without a Ray address (the job starts its own), with short temp
    paths for Ray's sockets."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**env, "TMPDIR": ray_tmp, "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def listening_addresses(root: psutil.Process) -> dict[str, set[str]]:
    """Each listening TCP address of ``root`` and its descendants, with the processes that hold
    it (Ray's workers are children of its raylet, itself a child of the driver)."""
    found: dict[str, set[str]] = {}
    for process in [root, *root.children(recursive=True)]:
        try:
            for connection in process.net_connections("inet"):
                if connection.status == psutil.CONN_LISTEN:
                    found.setdefault(connection.laddr.ip, set()).add(process.name())
        except psutil.Error:
            continue
    return found


def ray_processes_under(ray_tmp: str) -> list[str]:
    """Processes whose command line names the Ray temp directory of one job."""
    names = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if ray_tmp in cmdline:
            names.append(cmdline[:120])
    return names


@pytest.mark.slow
def test_a_local_job_with_two_ranks_and_the_collective_transport_listens_on_loopback_only(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = small_job(
        tiny_model_dir,
        tmp_path / "run",
        iterations=6,
        generators={"engine": "hf"},
        learner={"num_ranks": 2},
        weight_sync={"transport": "collective", "timeout_s": 60},
        metrics={"enabled": False},
    )
    ray_tmp = tempfile.mkdtemp(prefix="rlf-ray-", dir="/tmp")  # short: Ray's socket paths
    job = subprocess.Popen(
        job_command(write_config(tmp_path / "job.yaml", config)),
        env=job_environment(ray_tmp),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen: dict[str, set[str]] = {}
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(job.stdout), daemon=True)
    reader.start()
    root = psutil.Process(job.pid)
    try:
        while job.poll() is None:
            for address, holders in listening_addresses(root).items():
                seen.setdefault(address, set()).update(holders)
            time.sleep(0.2)
    finally:
        if job.poll() is None:
            job.kill()
    reader.join(timeout=30)
    assert job.returncode == 0, "".join(output)[-3000:]
    assert seen, "no listening socket seen: the check would prove nothing"
    assert {address for address in seen if address not in LOOPBACK} == set(), seen
    holders = set().union(*seen.values())
    assert {"raylet", "gcs_server"} <= holders, holders  # Ray's own, as well as the job's


@pytest.mark.slow
@pytest.mark.parametrize("after_s", [0.0, 3.0], ids=["ray-starting", "actors-loading"])
def test_sigterm_while_the_job_starts_ends_it_with_one_line_and_no_ray_process_left(
    tiny_model_dir: Path, tmp_path: Path, after_s: float
) -> None:
    """``after_s`` after Ray's first process appeared: inside ``ray.init`` (whose own SIGTERM
    handler exits with status 15 and no word), then while the actors load."""
    config = small_job(tiny_model_dir, tmp_path / "run", iterations=50)
    ray_tmp = tempfile.mkdtemp(prefix="rlf-ray-", dir="/tmp")
    job = subprocess.Popen(
        job_command(write_config(tmp_path / "job.yaml", config)),
        env=job_environment(ray_tmp),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while not ray_processes_under(ray_tmp) and time.monotonic() < deadline:
        time.sleep(0.1)  # Ray is starting: its first processes are up
    assert ray_processes_under(ray_tmp), "Ray never started"
    time.sleep(after_s)
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=60)
    assert job.returncode == 143, stderr[-3000:]
    assert (
        stderr.strip().splitlines()[-1] == "rlfleet train: stopped by SIGTERM; run the same command"
    )
    deadline = time.monotonic() + 30
    while ray_processes_under(ray_tmp) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray_processes_under(ray_tmp) == []
