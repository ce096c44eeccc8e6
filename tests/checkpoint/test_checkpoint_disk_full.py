"""A disk that fills up during a checkpoint (a real 2 MB tmpfs; skipped where mounting is not
allowed): the save fails with the system's "No space left on device", nothing is committed, and
the previous checkpoint stays the latest and loads."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from rlfleet.checkpoint.load import latest_checkpoint, list_checkpoints
from rlfleet.common.config import CheckpointConfig, MetricsConfig, PPOConfig
from rlfleet.learner.actor import LearnerActor, LearnerSettings


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MB tmpfs: room for one checkpoint of the tiny model (1.3 MB), not two."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


def test_a_full_disk_fails_the_save_and_keeps_the_previous_checkpoint(
    tiny_model_dir: Path, small_disk: Path
) -> None:
    learner = LearnerActor(
        LearnerSettings(
            str(tiny_model_dir),
            "ppo",
            PPOConfig(batch_size=8, mini_batch_size=4),
            seed=0,
            metrics=MetricsConfig(enabled=False),
        )
    )
    config = CheckpointConfig(uri=str(small_disk / "checkpoints"), keep_last=1)
    first = learner.save_checkpoint(config, {"iteration": 1})
    assert learner.wait_for_checkpoint() == first

    learner.version = 2
    with pytest.raises(Exception, match="No space left on device"):
        learner.save_checkpoint(config, {"iteration": 2})
        learner.wait_for_checkpoint()
    assert latest_checkpoint(config.uri) == first
    assert [info.step for info in list_checkpoints(config.uri)] == [0]
    assert learner.load_checkpoint(first, config)["iteration"] == 1
