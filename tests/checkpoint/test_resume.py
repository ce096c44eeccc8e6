"""Exact resume: N+M iterations straight give the same weights as N, a SIGKILL, and M more
through ``rlfleet train`` run again, without flags (it resumes from the latest checkpoint) or
with ``--resume-from latest`` (same seed, CPU), with checkpoints on S3."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from safetensors.torch import load_file
from support.job_configs import small_job, write_config

from rlfleet.checkpoint.command import pull_checkpoint
from rlfleet.checkpoint.commit import MANIFEST
from rlfleet.checkpoint.load import latest_checkpoint
from rlfleet.common.storage import open_storage

pytest_plugins = ["support.s3_server"]

if TYPE_CHECKING:
    from support.s3_server import S3Server

ITERATIONS = 5


def rlfleet_train(config: Path, *extra: str) -> subprocess.Popen:
    """``rlfleet train`` in its own process group (its local Ray instance included)."""
    return subprocess.Popen(
        [str(Path(sys.executable).with_name("rlfleet")), "train", "--config", str(config), *extra],
        env={**os.environ, "RAY_ADDRESS": ""},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(process: subprocess.Popen, timeout_s: float = 600) -> str:
    """The job's output, once it exited 0."""
    output, _ = process.communicate(timeout=timeout_s)
    assert process.returncode == 0, output[-4000:]
    return output


def committed_steps(uri: str) -> list[int]:
    storage = open_storage(uri)
    return [
        int(name.removeprefix("step-"))
        for name in storage.list_dir()
        if storage.exists(f"{name}/{MANIFEST}")
    ]


def kill_after_checkpoint(process: subprocess.Popen, uri: str, step: int) -> int:
    """SIGKILL the job's whole process group once checkpoint ``step`` (or a later one) is
    committed; returns the newest committed step at that moment."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()[0][-4000:]
        steps = committed_steps(uri)
        if steps and max(steps) >= step:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return max(steps)
        time.sleep(0.2)
    raise TimeoutError(f"no checkpoint {step} under {uri} in 600 s")


def saved_tensors(checkpoint_dir: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file of a checkpoint (per-rank files and exports)."""
    return {
        f"{path.relative_to(checkpoint_dir)}:{key}": tensor
        for path in sorted(checkpoint_dir.rglob("*.safetensors"))
        for key, tensor in load_file(str(path)).items()
    }


@pytest.fixture
def short_tmpdir(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """TMPDIR for the jobs' Ray sessions (and vLLM sockets): short enough for AF_UNIX paths."""
    directory = Path(tempfile.mkdtemp(prefix="rlfleet-resume-", dir="/tmp"))
    monkeypatch.setenv("TMPDIR", str(directory))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("temperature", "resume_args"),
    [(0.0, []), (1.0, ["--resume-from", "latest"])],
    ids=["greedy-same-command", "sampled-resume-from-latest"],
)
def test_killed_and_resumed_job_ends_with_the_weights_of_a_straight_run(
    temperature: float,
    resume_args: list[str],
    tiny_model_dir: Path,
    s3_env: S3Server,
    tmp_path: Path,
    short_tmpdir: Path,
) -> None:
    """Greedy generation isolates the learner's state (weights, optimizer, KL controller, data
    cursor, rollout ids); sampled generation also needs the generators' draws to be a function
    of the rollout, not of a stream that restarts with the job. The resumed run's stats.jsonl
    holds every iteration once."""
    straight_uri = str(tmp_path / "straight-checkpoints")
    resumed_uri = f"s3://{s3_env.bucket}/resume-test-{temperature}"
    job = {"iterations": ITERATIONS, "generators": {"engine": "hf", "temperature": temperature}}
    straight = small_job(
        tiny_model_dir, tmp_path / "straight", checkpoint={"uri": straight_uri}, **job
    )
    # The learner keeps its newest checkpoint in local_copy_dir and the resumed one reads it there.
    checkpoint = {"uri": resumed_uri, "every": 1, "local_copy_dir": str(tmp_path / "copies")}
    resumed = small_job(tiny_model_dir, tmp_path / "resumed", checkpoint=checkpoint, **job)
    straight_config = write_config(tmp_path / "straight.yaml", straight)
    resumed_config = write_config(tmp_path / "resumed.yaml", resumed)

    finish(rlfleet_train(straight_config))
    killed_at = kill_after_checkpoint(rlfleet_train(resumed_config), resumed_uri, step=2)
    assert 2 <= killed_at < ITERATIONS
    output = finish(rlfleet_train(resumed_config, *resume_args))
    resumed_at = re.search(
        rf"^resuming job 'rlfleet' from checkpoint {resumed_uri}/step-(\d+) \(iteration (\d+) "
        rf"of {ITERATIONS}\)$",
        output,
        re.MULTILINE,
    )
    assert resumed_at, output[-4000:]
    assert killed_at <= int(resumed_at.group(1)) == int(resumed_at.group(2)) < ITERATIONS
    lines = [json.loads(line) for line in (tmp_path / "resumed" / "stats.jsonl").open()]
    assert [line["iteration"] for line in lines] == list(range(1, ITERATIONS + 1))

    assert latest_checkpoint(resumed_uri) == f"{resumed_uri}/step-{ITERATIONS:08d}"
    copies = [path.name for path in (tmp_path / "copies").glob("*/step-*")]
    assert copies == [f"step-{ITERATIONS:08d}"]  # the newest only
    a = pull_checkpoint(straight_uri, tmp_path / "a")
    b = pull_checkpoint(resumed_uri, tmp_path / "b")
    tensors_a, tensors_b = saved_tensors(a), saved_tensors(b)
    assert tensors_a.keys() == tensors_b.keys()
    assert [k for k in tensors_a if not torch.equal(tensors_a[k], tensors_b[k])] == []
    state_a = json.loads((a / "job_state.json").read_text())
    state_b = json.loads((b / "job_state.json").read_text())
    assert state_a == state_b
    assert len(state_b["learner"]["consumed"]) == ITERATIONS * straight.ppo.batch_size
