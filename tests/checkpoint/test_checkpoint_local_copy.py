"""The local copy of the newest checkpoint that a learner keeps when ``checkpoint.uri`` is remote
(a real SeaweedFS S3 server): a restarted learner restores from it, one whose copy was tampered
with downloads from the store, and only the newest checkpoint is kept."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow.fs as pafs
import pytest
import torch

from rlfleet.checkpoint.local_copy import STAGING_PREFIX, local_copy_root
from rlfleet.checkpoint.saver import CheckpointSaver
from rlfleet.checkpoint.shards import CheckpointError
from rlfleet.common.config import CheckpointConfig, MetricsConfig, PPOConfig
from rlfleet.common.storage import open_storage
from rlfleet.learner.actor import LearnerActor, LearnerSettings

pytest_plugins = ["support.s3_server"]

if TYPE_CHECKING:
    from support.s3_server import S3Server

MODEL_FILE = "model.rank-00000-of-00001.safetensors"


def learner(model_dir: Path, seed: int) -> LearnerActor:
    """A one-rank learner; ``seed`` picks its value head's initial weights."""
    return LearnerActor(
        LearnerSettings(
            str(model_dir),
            "ppo",
            PPOConfig(batch_size=8, mini_batch_size=4),
            seed=seed,
            metrics=MetricsConfig(enabled=False),
        )
    )


def weights(actor: LearnerActor) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in actor.trainer.model.state_dict().items()}


def overwrite_same_size(path_in_store: str, filesystem: pafs.FileSystem) -> None:
    """Replaces a file with as many different bytes (so only its sha256 tells)."""
    with filesystem.open_input_stream(path_in_store) as stream:
        size = len(stream.read())
    with filesystem.open_output_stream(path_in_store) as stream:
        stream.write(b"\x00" * size)


@pytest.fixture
def saved(
    tiny_model_dir: Path, s3_env: S3Server, tmp_path: Path
) -> tuple[CheckpointConfig, str, dict[str, torch.Tensor]]:
    """Checkpoint step-0 of a seed-0 learner in S3; the config, its URI and the weights."""
    config = CheckpointConfig(
        uri=f"s3://{s3_env.bucket}/local-copy-{tmp_path.name}",
        local_copy_dir=str(tmp_path / "copies"),
    )
    saver = learner(tiny_model_dir, seed=0)
    saver.save_checkpoint(config, {"iteration": 0})
    uri = saver.wait_for_checkpoint()
    return config, uri, weights(saver)


def test_a_restarted_learner_restores_from_the_local_copy_without_the_stores_data(
    tiny_model_dir: Path, saved: tuple[CheckpointConfig, str, dict[str, torch.Tensor]]
) -> None:
    """The store's model file is overwritten (same size): the restore still matches the saved
    weights, so it read the local copy, verified against the manifest."""
    config, uri, saved_weights = saved
    storage = open_storage(uri)
    overwrite_same_size(storage.child(MODEL_FILE).root, storage.filesystem)

    restored = learner(tiny_model_dir, seed=1)
    assert restored.load_checkpoint(uri, config)["iteration"] == 0
    assert all(torch.equal(value, saved_weights[name]) for name, value in weights(restored).items())

    without_copy = config.model_copy(update={"local_copy_dir": None})
    with pytest.raises(CheckpointError, match=f"{MODEL_FILE} does not match the manifest"):
        learner(tiny_model_dir, seed=1).load_checkpoint(uri, without_copy)


def test_a_tampered_local_copy_falls_back_to_the_store(
    tiny_model_dir: Path,
    saved: tuple[CheckpointConfig, str, dict[str, torch.Tensor]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    config, uri, saved_weights = saved
    copy = local_copy_root(config.uri, config) / uri.rpartition("/")[2] / MODEL_FILE
    copy.write_bytes(b"\x00" * copy.stat().st_size)

    restored = learner(tiny_model_dir, seed=1)
    with caplog.at_level(logging.WARNING, logger="rlfleet.checkpoint.load"):
        restored.load_checkpoint(uri, config)
    assert f"{MODEL_FILE} in the local copy" in caplog.text
    assert all(torch.equal(value, saved_weights[name]) for name, value in weights(restored).items())


def test_only_the_newest_checkpoint_is_kept_locally(
    tiny_model_dir: Path, saved: tuple[CheckpointConfig, str, dict[str, torch.Tensor]]
) -> None:
    config, _, _ = saved
    actor = learner(tiny_model_dir, seed=0)
    actor.version = 1  # as after one step
    actor.save_checkpoint(config, {"iteration": 1})
    actor.wait_for_checkpoint()

    root = local_copy_root(config.uri, config)
    assert sorted(path.name for path in root.iterdir()) == [".staging", "step-00000001"]
    assert [path for path in (root / ".staging").rglob("*") if path.is_file()] == []
    assert (root / "step-00000001" / MODEL_FILE).is_file()


def test_the_staging_files_of_a_learner_killed_mid_upload_are_removed(
    tiny_model_dir: Path, saved: tuple[CheckpointConfig, str, dict[str, torch.Tensor]]
) -> None:
    config, _, _ = saved
    gone = subprocess.Popen(["true"])
    gone.wait()
    staging = local_copy_root(config.uri, config) / ".staging"
    orphan = staging / f"{STAGING_PREFIX}{gone.pid}-" / "step-00000003-x" / MODEL_FILE
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"half an upload")

    CheckpointSaver(config.uri, keep_last=1, config=config).close()
    assert [path.name for path in staging.iterdir()] == [f"{STAGING_PREFIX}{os.getpid()}-"]


def test_a_local_copy_dir_that_cannot_be_made_only_costs_the_copy(
    tiny_model_dir: Path, s3_env: S3Server, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "a-file").write_text("x")
    config = CheckpointConfig(
        uri=f"s3://{s3_env.bucket}/no-copy-{tmp_path.name}",
        local_copy_dir=str(tmp_path / "a-file" / "copies"),
    )
    actor = learner(tiny_model_dir, seed=0)
    with caplog.at_level(logging.WARNING, logger="rlfleet.checkpoint.saver"):
        actor.save_checkpoint(config, {"iteration": 0})
        uri = actor.wait_for_checkpoint()
    assert "no local copy of the checkpoints in" in caplog.text
    assert learner(tiny_model_dir, seed=1).load_checkpoint(uri, config)["iteration"] == 0
