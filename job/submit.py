"""``rlfleet submit``: run ``rlfleet train`` as a Ray job on a cluster.

It wraps Ray's ``JobSubmissionClient``: the working directory (the repository, by default) goes
up as the job's ``working_dir`` runtime env, so the config and the paths in it resolve there.

Ray 2.60 clusters use token authentication by default. The token is read from ``--token-file``,
else ``RAY_AUTH_TOKEN``, else the file named by ``RAY_AUTH_TOKEN_PATH``, else ``~/.ray/auth_token``,
and sent as ``Authorization: Bearer <token>``. A cluster started with ``RAY_AUTH_MODE=disabled``
needs none.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from rlfleet.common.config_file import load_job_config
from rlfleet.common.errors import first_line

TERMINAL_STATES = {"SUCCEEDED", "FAILED", "STOPPED"}
DEFAULT_EXCLUDES = [".git", ".venv", ".venv-trl", "runs", "**/__pycache__", "*.egg-info"]


def auth_token(token_file: str | None = None) -> str | None:
    """The cluster token from the first of: ``token_file``, RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH,
    ``~/.ray/auth_token``; None when there is none."""
    if token_file:
        return Path(token_file).read_text().strip()
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    return path.read_text().strip() if path.is_file() else None


def job_client(address: str, token_file: str | None = None) -> Any:
    from ray.job_submission import JobSubmissionClient

    token = auth_token(token_file)
    headers = {"Authorization": f"Bearer {token}"} if token else None
    return JobSubmissionClient(address, headers=headers)


def train_entrypoint(config: str, overrides: list[str], resume_from: str | None) -> str:
    """The job's shell command: ``rlfleet train`` with the same arguments."""
    words = ["rlfleet", "train", "--config", config]
    for override in overrides:
        words += ["--set", override]
    if resume_from:
        words += ["--resume-from", resume_from]
    return shlex.join(words)


def runtime_env(working_dir: str, runtime_env_file: str | None) -> dict[str, Any]:
    """``working_dir`` plus the optional YAML runtime env (``env_vars``, ``pip``, ...)."""
    env: dict[str, Any] = {}
    if runtime_env_file:
        env = yaml.safe_load(Path(runtime_env_file).read_text()) or {}
    env.setdefault("working_dir", working_dir)
    env.setdefault("excludes", DEFAULT_EXCLUDES)
    return env


def wait_for_job(client: Any, job_id: str, timeout_s: float, poll_s: float = 2.0) -> str:
    """Polls until the job ends; prints its logs at the end; returns the final status."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = str(client.get_job_status(job_id)).split(".")[-1]
        if status in TERMINAL_STATES:
            print(client.get_job_logs(job_id), end="")
            return status
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {status} after {timeout_s:.0f} s")
        time.sleep(poll_s)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", required=True, help="Ray dashboard, e.g. http://HOST:8265")
    parser.add_argument("--config", required=True, help="job config (YAML) inside --working-dir")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--resume-from", metavar="URI|latest")
    parser.add_argument("--working-dir", default=".", help="uploaded as the job's working_dir")
    parser.add_argument("--runtime-env", help="YAML runtime env, e.g. deploy/ray/runtime_env.yaml")
    parser.add_argument("--token-file", help="cluster auth token (default: see module docs)")
    parser.add_argument("--submission-id", help="job id to use (default: Ray picks one)")
    parser.add_argument("--no-wait", action="store_true", help="return once submitted")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds to wait for the job")


def run(args: argparse.Namespace) -> int:
    """0 when the job succeeded (or, with ``--no-wait``, was submitted), 1 when it failed or
    the wait for it did, 2 when nothing was submitted: an invalid config, a cluster that
    cannot be reached at ``--address`` or that refuses the submission (each one line)."""
    from rlfleet.job.train import config_error_line

    config_path = Path(args.working_dir) / args.config
    try:
        load_job_config(config_path, args.overrides)
    except (ValueError, OSError) as exc:
        print(
            f"rlfleet submit: invalid job config {config_path}: {config_error_line(exc)}",
            file=sys.stderr,
        )
        return 2
    try:
        client = job_client(args.address, args.token_file)
        job_id = client.submit_job(
            entrypoint=train_entrypoint(args.config, args.overrides, args.resume_from),
            runtime_env=runtime_env(args.working_dir, args.runtime_env),
            submission_id=args.submission_id,
        )
    except Exception as exc:  # noqa: BLE001 - Ray's client raises plain ones (ConnectionError, RuntimeError)
        print(f"rlfleet submit: {submission_error_line(args.address, exc)}", file=sys.stderr)
        return 2
    print(f"submitted {job_id} to {args.address}")
    if args.no_wait:
        return 0
    try:
        status = wait_for_job(client, job_id, args.timeout)
    except Exception as exc:  # noqa: BLE001 - as above, while polling the job
        print(
            f"rlfleet submit: job {job_id} on {args.address}: {first_line(exc)}; see it with "
            f"ray job status {job_id} --address {args.address}",
            file=sys.stderr,
        )
        return 1
    print(f"job {job_id}: {status}")
    return 0 if status == "SUCCEEDED" else 1


def submission_error_line(address: str, exc: BaseException) -> str:
    """Why a submission to ``address`` failed, as one line saying what to check: the address
    (nothing answers there) or the token (the cluster refused it)."""
    message = first_line(exc)
    if isinstance(exc, ConnectionError) or "Failed to connect" in message:
        return (
            f"--address: cannot reach a Ray dashboard at {address} ({message}); check the "
            "address (http://HEAD:8265) and that the cluster is up"
        )
    if isinstance(exc, OSError):
        return f"cannot submit to {address}: {message}"
    return (
        f"the cluster at {address} refused the submission: {message}; check --token-file (or "
        "RAY_AUTH_TOKEN) when it needs a token"
    )
