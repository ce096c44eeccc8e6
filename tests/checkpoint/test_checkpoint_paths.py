"""A checkpoint's file names, read from a store's listing or a manifest, never lead outside the
directory they belong in: pull and resume refuse such a checkpoint in one line that names the file
and the checkpoint, before anything is written or read (``safe_join``, common/storage.py).

The hostile bucket is an in-memory store behind the ``s3://`` code path (support/hostile_store.py:
the SeaweedFS test server refuses keys with ``..`` parts); the real server plays a bucket whose
manifest alone is hostile, and local directories hold symlinks that lead outside.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from support.hostile_store import HostileStore
from test_checkpoint import JOB_STATE, build_trainer, write_format_1_checkpoint

from rlfleet.checkpoint.command import pull_checkpoint
from rlfleet.checkpoint.load import load_checkpoint
from rlfleet.checkpoint.saver import save_checkpoint
from rlfleet.checkpoint.shards import CheckpointError
from rlfleet.cli import main as rlfleet
from rlfleet.common.storage import open_storage
from rlfleet.trainers.ppo import PPOTrainer

pytest_plugins = ["support.s3_server"]

if TYPE_CHECKING:
    from support.s3_server import S3Server

RUN = "s3://bucket/run"
STEP = f"{RUN}/step-00000006"
ESCAPE = "../../../../escaped.txt"
"""From ``<tmp>/1/2/3/4/<dir>/``, this lands in ``<tmp>/1/``: inside the test's own directory."""


@pytest.fixture
def hostile(monkeypatch: pytest.MonkeyPatch) -> HostileStore:
    return HostileStore.serving_s3(monkeypatch)


@pytest.fixture
def trainer(tiny_model_dir: Path) -> PPOTrainer:
    return build_trainer(tiny_model_dir, init_seed=0)


@pytest.fixture
def saved(trainer: PPOTrainer, hostile: HostileStore) -> str:
    """A good checkpoint (step 6) in the hostile bucket."""
    return save_checkpoint(RUN, 6, trainer, JOB_STATE, keep_last=1)


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where a resume downloads a remote checkpoint's files (its temporary directories) in this
    test: four levels under ``tmp_path``, so that what ``ESCAPE`` reaches is still in it."""
    directory = tmp_path / "1" / "2" / "3" / "scratch"
    directory.mkdir(parents=True)
    monkeypatch.setattr(tempfile, "tempdir", str(directory))
    return directory


def files_under(root: Path) -> set[str]:
    return {path.relative_to(root).as_posix() for path in root.rglob("*") if path.is_file()}


def assert_one_line_naming(error: pytest.ExceptionInfo[CheckpointError], name: str, where: str):
    message = str(error.value)
    assert "\n" not in message
    assert f"{where}: refusing the file name {name!r}" in message


def test_pull_refuses_a_listing_that_leads_outside(
    saved: str, hostile: HostileStore, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    hostile.put(f"{STEP}/{ESCAPE}", b"written by whoever holds the bucket")
    destination = tmp_path / "1" / "2" / "3" / "4" / "pulled"

    with pytest.raises(CheckpointError) as refused:
        pull_checkpoint(RUN, destination)

    assert_one_line_naming(refused, ESCAPE, STEP)
    assert files_under(tmp_path) == set()
    assert rlfleet(["checkpoints", "pull", RUN, str(destination)]) == 1
    error = capsys.readouterr().err
    assert error.startswith("rlfleet checkpoints pull: ") and error.count("\n") == 1
    assert repr(ESCAPE) in error
    assert files_under(tmp_path) == set()


def test_pull_refuses_a_manifest_that_leads_outside(
    saved: str, hostile: HostileStore, tmp_path: Path
) -> None:
    hostile.add_to_checkpoint(STEP, f"policy/{ESCAPE}", b"x")
    destination = tmp_path / "1" / "2" / "3" / "4" / "pulled"

    with pytest.raises(CheckpointError) as refused:
        pull_checkpoint(RUN, destination)

    assert_one_line_naming(refused, f"policy/{ESCAPE}", STEP)
    assert files_under(tmp_path) == set()


@pytest.mark.parametrize("name", [f"policy/{ESCAPE}", "/tmp/absolute.safetensors", "a//b"])
def test_resume_refuses_a_format_2_manifest_that_leads_outside(
    saved: str,
    hostile: HostileStore,
    tiny_model_dir: Path,
    tmp_path: Path,
    scratch: Path,
    name: str,
) -> None:
    hostile.add_to_checkpoint(STEP, name, b"x")
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(RUN, build_trainer(tiny_model_dir, init_seed=1))
    assert_one_line_naming(refused, name, STEP)
    assert files_under(tmp_path) == set()


def test_resume_refuses_a_format_1_manifest_whose_policy_leads_outside(
    trainer: PPOTrainer,
    hostile: HostileStore,
    tiny_model_dir: Path,
    tmp_path: Path,
    scratch: Path,
) -> None:
    """A format-1 resume reads every ``policy/*.safetensors`` the manifest lists: before the fix
    it downloaded this one to ``<scratch>/../escaped.safetensors``."""
    write_format_1_checkpoint(tmp_path / "v1" / "step-00000001", trainer, JOB_STATE)
    open_storage("s3://bucket/v1").upload_dir(tmp_path / "v1")
    step = "s3://bucket/v1/step-00000001"
    name = "policy/../../../escaped.safetensors"
    weights = (tmp_path / "v1" / "step-00000001" / "policy" / "model.safetensors").read_bytes()
    hostile.add_to_checkpoint(step, name, weights)
    before = files_under(tmp_path)

    with pytest.raises(CheckpointError) as refused:
        load_checkpoint("s3://bucket/v1", build_trainer(tiny_model_dir, init_seed=1))

    assert_one_line_naming(refused, name, step)
    assert files_under(tmp_path) == before


def test_the_s3_server_with_a_manifest_that_leads_outside_is_refused(
    trainer: PPOTrainer, s3_env: S3Server, tiny_model_dir: Path, tmp_path: Path, scratch: Path
) -> None:
    """The real server takes no ``..`` key, but a manifest can still name one: resume and pull
    refuse it before reading or writing a file."""
    root = f"s3://{s3_env.bucket}/hostile-manifest-{tmp_path.name}"
    step = save_checkpoint(root, 1, trainer, JOB_STATE, keep_last=1)
    storage = open_storage(step)
    manifest = json.loads(storage.read_bytes("MANIFEST.json"))
    manifest["files"][f"policy/{ESCAPE}"] = manifest["files"]["policy/model.safetensors"]
    storage.write_bytes("MANIFEST.json", json.dumps(manifest).encode())

    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(root, build_trainer(tiny_model_dir, init_seed=1))

    assert_one_line_naming(refused, f"policy/{ESCAPE}", step)
    assert files_under(tmp_path) == set()
    with pytest.raises(CheckpointError) as refused:
        pull_checkpoint(root, tmp_path / "1" / "2" / "3" / "4" / "pulled")
    assert_one_line_naming(refused, f"policy/{ESCAPE}", step)
    assert files_under(tmp_path) == set()


def test_a_local_checkpoint_with_a_symlink_outside_is_refused_before_reading(
    trainer: PPOTrainer, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A rank file replaced by a symlink to a copy outside the checkpoint (same bytes, so size
    and sha256 match): neither resume nor pull reads it."""
    step = Path(save_checkpoint(str(tmp_path / "run"), 1, trainer, JOB_STATE, keep_last=1))
    name = "model.rank-00000-of-00001.safetensors"
    outside = tmp_path / "outside.safetensors"
    (step / name).rename(outside)
    (step / name).symlink_to(outside)

    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(str(tmp_path / "run"), build_trainer(tiny_model_dir, init_seed=1))
    assert_one_line_naming(refused, name, str(step))
    with pytest.raises(CheckpointError) as refused:
        pull_checkpoint(str(step), tmp_path / "pulled")
    assert_one_line_naming(refused, name, str(step))
    assert not (tmp_path / "pulled").exists()
