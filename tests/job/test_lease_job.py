"""Two ``rlfleet train`` runs of one job (real processes, local Ray, the tiny model): while the
first lives, the second is refused with one line and exit 2, before Ray starts and without
touching the first's files; once the first is killed (SIGKILL, its lease left behind), the
same command (with fewer iterations, to end soon) takes the lease over and resumes, and
stats.jsonl holds every iteration once."""

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

import pytest
from support.job_configs import small_job, write_config

from rlfleet.checkpoint.load import latest_checkpoint
from rlfleet.job.lease import LEASE_NAME

ITERATIONS = 1000
"""The first run's: it is still training when the second one starts."""


def rlfleet_train(config: Path, tmpdir: Path, *extra: str) -> subprocess.Popen:
    """``rlfleet train`` in its own process group (its local Ray instance included)."""
    rlfleet = str(Path(sys.executable).with_name("rlfleet"))
    return subprocess.Popen(
        [rlfleet, "train", "--config", str(config), *extra],
        env={**os.environ, "RAY_ADDRESS": "", "TMPDIR": str(tmpdir)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def committed_step(uri: Path) -> int:
    latest = latest_checkpoint(str(uri))
    return int(latest.rpartition("step-")[2]) if latest else 0


@pytest.fixture
def short_tmpdir() -> Iterator[Path]:
    """TMPDIR for the jobs' Ray sessions: short enough for AF_UNIX paths."""
    directory = Path(tempfile.mkdtemp(prefix="rlf-lease-", dir="/tmp"))
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


@pytest.mark.slow
def test_a_second_run_is_refused_while_the_first_lives_and_takes_over_once_it_is_killed(
    tiny_model_dir: Path, tmp_path: Path, short_tmpdir: Path
) -> None:
    out, checkpoints = tmp_path / "run", tmp_path / "checkpoints"
    config = write_config(
        tmp_path / "job.yaml",
        small_job(
            tiny_model_dir,
            out,
            iterations=ITERATIONS,
            generators={"engine": "hf"},
            checkpoint={"uri": str(checkpoints), "every": 1},
            metrics={"enabled": False},
        ),
    )
    first = rlfleet_train(config, short_tmpdir)
    try:
        deadline = time.monotonic() + 600
        while committed_step(checkpoints) < 1:  # the first run is training
            assert first.poll() is None, first.communicate()
            assert time.monotonic() < deadline, "no checkpoint in 600 s"
            time.sleep(0.2)
        stats_before = (out / "stats.jsonl").read_text()

        second = rlfleet_train(config, short_tmpdir)
        stdout, stderr = second.communicate(timeout=300)
        assert second.returncode == 2, stdout + stderr
        assert first.poll() is None  # still training
        lines = stderr.strip().splitlines()
        assert len(lines) == 1, stderr
        assert re.fullmatch(
            rf"rlfleet train: output_dir: {re.escape(str(out))} is in use by rlfleet train "
            rf"\(pid {first.pid} on host \S+, since [\d-]+ [\d:]+ \w+\); stop it or choose "
            r"another output_dir",
            lines[0],
        ), lines[0]
        assert (out / "stats.jsonl").read_text().startswith(stats_before)  # not restarted
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    killed_at = committed_step(checkpoints)
    assert 1 <= killed_at < ITERATIONS
    assert (out / LEASE_NAME).exists()  # left behind by the killed run

    last = killed_at + 2
    rerun = rlfleet_train(config, short_tmpdir, "--set", f"iterations={last}")
    stdout, stderr = rerun.communicate(timeout=900)
    assert rerun.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert re.search(
        rf"^output_dir: took over the lease on {re.escape(str(out))} from rlfleet train \(pid "
        rf"{first.pid} on host \S+, since [^)]+\), which is gone$",
        stdout,
        re.MULTILINE,
    ), stdout
    assert re.search(
        rf"^resuming job 'rlfleet' from checkpoint {re.escape(str(checkpoints))}/step-\d+ "
        rf"\(iteration {killed_at} of {last}\)$",
        stdout,
        re.MULTILINE,
    ), stdout
    stats = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert [line["iteration"] for line in stats] == list(range(1, last + 1))
    assert not (out / LEASE_NAME).exists()  # released at the end
    assert not (checkpoints / LEASE_NAME).exists()
