"""``rlfleet submit`` against a real ``ray start --head`` cluster on loopback.

The cluster gets free ports and a private ``--temp-dir``, runs with ``RAY_AUTH_MODE=disabled``
and is stopped by killing only its own processes (never ``ray stop``: other Ray clusters may
share the machine).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest
import yaml
from support.ports import free_ports

from rlfleet.cli import main
from rlfleet.job.submit import auth_token, runtime_env, train_entrypoint

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def wait_for_dashboard(url: str, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log.read_text()}")
        try:
            with urllib.request.urlopen(f"{url}/api/version", timeout=2) as response:
                if response.status == 200:
                    return
        except urllib.error.HTTPError:
            return  # it answered: 401 on a token-auth cluster
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"no Ray dashboard at {url} after {timeout_s} s:\n{log.read_text()}")


def stop_cluster(proc: subprocess.Popen, temp_dir: str) -> None:
    """Stops this cluster only: its ``ray start --block`` process group, then any process of it
    still alive (each names the cluster's private temp dir on its command line)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
    leftovers = []
    for candidate in psutil.process_iter(["cmdline"]):
        if any(temp_dir in part for part in candidate.info["cmdline"] or ()):
            leftovers.append(candidate)
    for leftover in leftovers:
        leftover.kill()
    psutil.wait_procs(leftovers, timeout=10)


@contextmanager
def ray_cluster(auth_env: dict[str, str]) -> Iterator[str]:
    """A real single-node Ray cluster on 127.0.0.1 with the given RAY_AUTH_* settings; yields
    its dashboard (job API) address."""
    temp_dir = tempfile.mkdtemp(prefix="rlf-", dir="/tmp")
    # One call, so that no worker port repeats a component's port.
    ports = free_ports(9 + 40)
    gcs, dashboard, client, node, objects, agent, agent_grpc, metrics, env_agent = ports[:9]
    workers = ",".join(map(str, ports[9:]))
    env = {
        **os.environ,
        **auth_env,
        "RAY_ADDRESS": "",
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "TMPDIR": temp_dir,
        "HF_HUB_OFFLINE": "1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }
    log = Path(temp_dir) / "ray-start.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                str(BIN / "ray"),
                "start",
                "--head",
                "--block",
                "--disable-usage-stats",
                "--node-ip-address=127.0.0.1",
                f"--port={gcs}",
                "--dashboard-host=127.0.0.1",
                f"--dashboard-port={dashboard}",
                f"--ray-client-server-port={client}",
                f"--node-manager-port={node}",
                f"--object-manager-port={objects}",
                f"--dashboard-agent-listen-port={agent}",
                f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--metrics-export-port={metrics}",
                f"--runtime-env-agent-port={env_agent}",
                f"--worker-port-list={workers}",
                "--num-cpus=4",
                f"--temp-dir={temp_dir}",
            ],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    address = f"http://127.0.0.1:{dashboard}"
    try:
        wait_for_dashboard(address, proc, log, timeout_s=120)
        yield address
    finally:
        stop_cluster(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[str]:
    with ray_cluster({"RAY_AUTH_MODE": "disabled"}) as address:
        yield address


def tiny_job_dir(root: Path, model_dir: Path, output_dir: Path) -> Path:
    """A working dir with the model, prompts and a 2-iteration job config, paths relative."""
    job_dir = root / "job"
    shutil.copytree(model_dir, job_dir / "model")
    shutil.copy(REPO / "examples" / "demo_prompts.jsonl", job_dir / "prompts.jsonl")
    config = {
        "name": "submit-test",
        "model": "model",
        "dataset": {"path": "prompts.jsonl"},
        "generators": {"num_actors": 1, "max_new_tokens": 8},
        "reward": {"function": "rlfleet.reward.functions:sentiment"},
        "ppo": {"batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 1, "learning_rate": 1e-3},
        "iterations": 2,
        "output_dir": str(output_dir),
    }
    (job_dir / "job.yaml").write_text(yaml.safe_dump(config))
    return job_dir


def rlfleet_submit(address: str, job_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    """``rlfleet submit`` from a client with no Ray auth settings of its own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    return subprocess.run(
        [
            str(BIN / "rlfleet"),
            "submit",
            "--address",
            address,
            "--working-dir",
            str(job_dir),
            "--config",
            "job.yaml",
            "--runtime-env",
            str(REPO / "deploy" / "ray" / "runtime_env.yaml"),
            "--timeout",
            "400",
            *extra,
        ],
        capture_output=True,
        text=True,
        env={**env, "RAY_ADDRESS": "", "HOME": str(job_dir.parent)},
        timeout=480,
    )


@pytest.mark.slow
def test_rlfleet_submit_runs_a_job_to_success_on_a_real_cluster(
    ray_head: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    output_dir = tmp_path / "out"
    job_dir = tiny_job_dir(tmp_path, tiny_model_dir, output_dir)
    proc = rlfleet_submit(ray_head, job_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCEEDED" in proc.stdout
    assert "done: 2 iterations (1..2), 16 rollouts" in proc.stdout
    stats = [json.loads(line) for line in (output_dir / "stats.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in stats] == [1, 2]
    assert [line["rollout_ids"] for line in stats] == [[0, 7], [8, 15]]


@pytest.mark.slow
def test_a_token_cluster_refuses_a_submission_without_the_token_and_runs_one_with_it(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    token = secrets.token_hex(16)
    (tmp_path / "token").write_text(token)
    output_dir = tmp_path / "out"
    job_dir = tiny_job_dir(tmp_path, tiny_model_dir, output_dir)
    with ray_cluster({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token}) as address:
        refused = rlfleet_submit(address, job_dir)
        accepted = rlfleet_submit(address, job_dir, "--token-file", str(tmp_path / "token"))
    assert refused.returncode != 0
    assert "Authentication required" in refused.stderr
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert "done: 2 iterations (1..2), 16 rollouts" in accepted.stdout


def test_a_submission_to_an_address_nobody_answers_is_one_line_and_exit_2(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Used to be a 91-line traceback from Ray's client."""
    job_dir = tiny_job_dir(tmp_path, tiny_model_dir, tmp_path / "out")
    address = f"http://127.0.0.1:{free_ports(1)[0]}"
    args = ["submit", "--address", address, "--working-dir", str(job_dir), "--config", "job.yaml"]
    assert main(args) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"rlfleet submit: --address: cannot reach a Ray dashboard at {address} (Failed to "
        f"connect to Ray at address: {address}.); check the address (http://HEAD:8265) and that "
        "the cluster is up"
    ]


def test_a_cluster_that_refuses_the_token_is_one_line_and_exit_2(
    tiny_model_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What Ray's client raises for a 401 (the real cluster's answer: the slow test above)."""
    from ray.exceptions import AuthenticationError

    from rlfleet.job import submit

    def refused(address: str, token_file: str | None = None) -> None:
        raise AuthenticationError("Authentication required: Unauthorized\n\nSet RAY_AUTH_TOKEN")

    monkeypatch.setattr(submit, "job_client", refused)
    job_dir = tiny_job_dir(tmp_path, tiny_model_dir, tmp_path / "out")
    args = ["--address", "http://head:8265", "--working-dir", str(job_dir), "--config", "job.yaml"]
    assert main(["submit", *args]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "rlfleet submit: the cluster at http://head:8265 refused the submission: Authentication "
        "required: Unauthorized; check --token-file (or RAY_AUTH_TOKEN) when it needs a token"
    ]


def test_an_invalid_config_is_one_line_and_exit_2_before_any_connection(
    tiny_model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    job_dir = tiny_job_dir(tmp_path, tiny_model_dir, tmp_path / "out")
    args = ["submit", "--address", "http://127.0.0.1:1", "--working-dir", str(job_dir)]
    assert main([*args, "--config", "job.yaml", "--set", "generators.num_actors=[1,2]"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"rlfleet submit: invalid job config {job_dir / 'job.yaml'}: generators.num_actors: "
        "Input should be a valid integer (got [1, 2])"
    ]


def test_the_entrypoint_repeats_the_train_arguments() -> None:
    entrypoint = train_entrypoint("job.yaml", ["generators.num_actors=3", "name=a b"], "latest")
    assert entrypoint == (
        "rlfleet train --config job.yaml --set generators.num_actors=3 --set 'name=a b' "
        "--resume-from latest"
    )


def test_the_runtime_env_uploads_the_working_dir_and_keeps_the_file_settings(
    tmp_path: Path,
) -> None:
    env = runtime_env(str(tmp_path), str(REPO / "deploy" / "ray" / "runtime_env.yaml"))
    assert env["working_dir"] == str(tmp_path)
    assert env["env_vars"]["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
    assert ".venv" in env["excludes"]


def test_the_auth_token_comes_from_the_file_then_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert auth_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("home-token\n")
    assert auth_token() == "home-token"
    (tmp_path / "elsewhere").write_text("path-token")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "elsewhere"))
    assert auth_token() == "path-token"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "env-token")
    assert auth_token() == "env-token"
    (tmp_path / "given").write_text("file-token")
    assert auth_token(str(tmp_path / "given")) == "file-token"
