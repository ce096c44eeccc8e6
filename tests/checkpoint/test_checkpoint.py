"""learner.checkpoint with a real PPOTrainer, on local disk and on a real SeaweedFS S3 server."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from safetensors.torch import save_file
from support.batches import ppo_step_batch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlfleet.checkpoint.command import pull_checkpoint
from rlfleet.checkpoint.commit import MANIFEST
from rlfleet.checkpoint.load import latest_checkpoint, list_checkpoints, load_checkpoint
from rlfleet.checkpoint.saver import CheckpointSaver, save_checkpoint
from rlfleet.checkpoint.shards import CheckpointError
from rlfleet.checkpoint.state import save_state
from rlfleet.cli import main as rlfleet
from rlfleet.common.config import CheckpointConfig, CriticFreeConfig, PPOConfig
from rlfleet.common.storage import StorageCredentialsError, open_storage
from rlfleet.trainers.critic_free import CriticFreeTrainer
from rlfleet.trainers.ppo import PPOTrainer
from rlfleet.trainers.value_head import AutoModelForCausalLMWithValueHead

pytest_plugins = ["support.s3_server"]

if TYPE_CHECKING:
    from support.s3_server import S3Server

BATCH = 4
STORED_SUFFIXES = {".json", ".safetensors", ".txt"}


def build_trainer(model_dir: Path, init_seed: int) -> PPOTrainer:
    """A PPOTrainer on the tiny model with Adam and a StepLR schedule; ``init_seed`` picks the
    value head's random initial weights."""
    torch.manual_seed(init_seed)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.9)
    config = PPOConfig(batch_size=BATCH, mini_batch_size=2, ppo_epochs=2, seed=0)
    return PPOTrainer(
        config=config,
        model=model,
        tokenizer=AutoTokenizer.from_pretrained(model_dir),
        optimizer=optimizer,
        lr_scheduler=scheduler,
    )


def weights(trainer: PPOTrainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert different == []


def assert_same_optimizer(a: PPOTrainer, b: PPOTrainer) -> None:
    state_a, state_b = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert state_a["param_groups"] == state_b["param_groups"]
    assert state_a["state"].keys() == state_b["state"].keys()
    for index, slots in state_a["state"].items():
        for name, value in slots.items():
            assert torch.equal(value, state_b["state"][index][name]), (index, name)


@pytest.fixture
def trained(tiny_model_dir: Path) -> PPOTrainer:
    trainer = build_trainer(tiny_model_dir, init_seed=0)
    trainer.step(*ppo_step_batch(1))
    return trainer


@pytest.fixture(params=["local", "s3"])
def checkpoint_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "checkpoints")
    server = request.getfixturevalue("s3_env")
    return f"s3://{server.bucket}/{re.sub(r'[^a-z0-9]+', '-', request.node.name)}"


JOB_STATE = {"dataset": {"epoch": 1, "position": 7}, "policy_version": 1, "next_rollout_id": 8}


def test_round_trip_then_one_more_step_gives_identical_training(
    trained: PPOTrainer, tiny_model_dir: Path, checkpoint_uri: str
) -> None:
    step_uri = save_checkpoint(checkpoint_uri, 1, trained, JOB_STATE, keep_last=2)
    assert step_uri == f"{checkpoint_uri}/step-00000001"

    fresh = build_trainer(tiny_model_dir, init_seed=1)
    assert load_checkpoint(checkpoint_uri, fresh) == JOB_STATE
    assert_same_weights(weights(fresh), weights(trained))
    assert_same_optimizer(fresh, trained)
    assert fresh.lr_scheduler.state_dict() == trained.lr_scheduler.state_dict()
    assert fresh.training_state() == trained.training_state()

    stats_a, stats_b = trained.step(*ppo_step_batch(2)), fresh.step(*ppo_step_batch(2))
    assert_same_weights(weights(fresh), weights(trained))
    assert_same_optimizer(fresh, trained)
    assert stats_a["objective/kl"] == stats_b["objective/kl"]
    assert fresh.training_state() == trained.training_state()


def test_policy_directory_loads_with_auto_model_and_nothing_is_pickled(
    trained: PPOTrainer, tmp_path: Path
) -> None:
    step_dir = Path(save_checkpoint(str(tmp_path), 3, trained, JOB_STATE, keep_last=1))
    policy = AutoModelForCausalLM.from_pretrained(step_dir / "policy")
    assert_same_weights(policy.state_dict(), trained.model.pretrained_model.state_dict())
    AutoTokenizer.from_pretrained(step_dir / "policy")

    files = [p for p in step_dir.rglob("*") if p.is_file()]
    assert {p.suffix for p in files} <= STORED_SUFFIXES
    manifest = json.loads((step_dir / MANIFEST).read_text())
    assert manifest["step"] == 3
    assert sorted(manifest["files"]) == sorted(
        p.relative_to(step_dir).as_posix() for p in files if p.name != MANIFEST
    )
    assert manifest["format"] == "rlfleet-checkpoint/2" and manifest["ranks"] == 1
    assert {
        "value_head.safetensors",
        "model.rank-00000-of-00001.safetensors",
        "optimizer.rank-00000-of-00001.safetensors",
        "optimizer.json",
        "lr_scheduler.json",
    } <= set(manifest["files"])


def test_keep_last_prunes_old_checkpoints_after_commit(
    trained: PPOTrainer, checkpoint_uri: str
) -> None:
    for step in (1, 2, 3, 4):
        save_checkpoint(checkpoint_uri, step, trained, {"step": step}, keep_last=2)
    assert [info.step for info in list_checkpoints(checkpoint_uri)] == [3, 4]
    assert latest_checkpoint(checkpoint_uri) == f"{checkpoint_uri}/step-00000004"
    assert open_storage(checkpoint_uri).list_dir() == ["step-00000003", "step-00000004"]


def test_exception_mid_save_leaves_previous_checkpoint_latest(
    trained: PPOTrainer, tiny_model_dir: Path, checkpoint_uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_checkpoint(checkpoint_uri, 1, trained, {"step": 1}, keep_last=3)

    def crash() -> dict:
        raise RuntimeError("disk on fire")

    with monkeypatch.context() as patch:
        patch.setattr(trained, "training_state", crash)
        with pytest.raises(RuntimeError, match="disk on fire"):
            save_checkpoint(checkpoint_uri, 2, trained, {"step": 2}, keep_last=3)
    assert latest_checkpoint(checkpoint_uri) == f"{checkpoint_uri}/step-00000001"
    assert load_checkpoint(checkpoint_uri, build_trainer(tiny_model_dir, 1)) == {"step": 1}
    with pytest.raises(CheckpointError, match="not a committed checkpoint"):
        load_checkpoint(f"{checkpoint_uri}/step-2", build_trainer(tiny_model_dir, 1))

    save_checkpoint(checkpoint_uri, 2, trained, {"step": 2}, keep_last=3)
    assert [info.step for info in list_checkpoints(checkpoint_uri)] == [1, 2]


KILLED_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    sys.path[:0] = [{test_dir!r}, {tests_dir!r}]
    from support.batches import ppo_step_batch
    from test_checkpoint import build_trainer
    from rlfleet.common.storage import Storage
    from rlfleet.checkpoint.saver import save_checkpoint

    uri, model_dir, where = sys.argv[1:]
    trainer = build_trainer(model_dir, init_seed=0)
    trainer.step(*ppo_step_batch(1))
    save_checkpoint(uri, 1, trainer, {{"step": 1}}, keep_last=3)
    trainer.step(*ppo_step_batch(2))

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if where == "between-files":
        trainer.training_state = die
    else:
        upload_dir = Storage.upload_dir

        def upload_then_die(self, *args, **kwargs):
            upload_dir(self, *args, **kwargs)
            die()

        Storage.upload_dir = upload_then_die
    save_checkpoint(uri, 2, trainer, {{"step": 2}}, keep_last=3)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("checkpoint_uri", "where"),
    [("local", "between-files"), ("s3", "after-upload")],
    indirect=["checkpoint_uri"],
)
def test_process_killed_mid_save_leaves_previous_checkpoint_latest(
    checkpoint_uri: str, where: str, tiny_model_dir: Path
) -> None:
    """SIGKILL half-way through writing step 2: locally between two files, or on S3 once every
    file is uploaded but before the manifest."""
    here = Path(__file__).parent
    script = KILLED_SAVE.format(test_dir=str(here), tests_dir=str(here.parent))
    child = subprocess.run(
        [sys.executable, "-c", script, checkpoint_uri, str(tiny_model_dir), where],
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]

    storage = open_storage(checkpoint_uri)
    assert storage.exists("step-00000002/policy/model.safetensors")
    assert not storage.exists(f"step-00000002/{MANIFEST}")
    assert latest_checkpoint(checkpoint_uri) == f"{checkpoint_uri}/step-00000001"
    assert [info.step for info in list_checkpoints(checkpoint_uri)] == [1]
    resumed = build_trainer(tiny_model_dir, init_seed=1)
    assert load_checkpoint(checkpoint_uri, resumed) == {"step": 1}


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    "name",
    ["model.rank-00000-of-00001.safetensors", "optimizer.rank-00000-of-00001.safetensors"],
)
def test_corrupt_file_is_refused(
    trained: PPOTrainer, tiny_model_dir: Path, tmp_path: Path, name: str
) -> None:
    step_dir = Path(save_checkpoint(str(tmp_path / "ckpt"), 1, trained, {}, keep_last=1))
    flip_last_byte(step_dir / name)
    with pytest.raises(CheckpointError, match=f"{re.escape(name)} does not match"):
        load_checkpoint(str(step_dir), build_trainer(tiny_model_dir, 1))
    with pytest.raises(CheckpointError, match=f"{re.escape(name)} does not match"):
        pull_checkpoint(str(step_dir), tmp_path / "pulled")


def test_corrupt_export_is_refused_by_pull(trained: PPOTrainer, tmp_path: Path) -> None:
    """A resume does not read the exports (policy/, value_head.safetensors); a pull checks
    every file."""
    step_dir = Path(save_checkpoint(str(tmp_path / "ckpt"), 1, trained, {}, keep_last=1))
    flip_last_byte(step_dir / "value_head.safetensors")
    with pytest.raises(CheckpointError, match="value_head.safetensors does not match"):
        pull_checkpoint(str(step_dir), tmp_path / "pulled")


def rewrite_manifest(step_dir: Path, edit) -> None:
    manifest = json.loads((step_dir / MANIFEST).read_text())
    edit(manifest)
    (step_dir / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("tamper", "message"),
    [
        (lambda d: rewrite_manifest(d, lambda m: m.update(files={})), "does not list"),
        (
            lambda d: rewrite_manifest(d, lambda m: m["files"].pop("value_head.safetensors")),
            r"does not list \['value_head.safetensors'\]",
        ),
        (
            lambda d: (d / "extra.safetensors").write_bytes(b"not vouched for"),
            r"\['extra.safetensors'\] are not in the manifest",
        ),
        (
            lambda d: (d / MANIFEST).write_text((d / MANIFEST).read_text()[:40]),
            "MANIFEST.json is not valid JSON",
        ),
        (
            lambda d: rewrite_manifest(d, lambda m: m.update(format="other/9")),
            "format 'other/9'",
        ),
    ],
    ids=["empty-file-list", "entry-removed", "extra-file", "truncated", "other-format"],
)
def test_a_tampered_checkpoint_is_refused_with_a_clear_error(
    trained: PPOTrainer, tiny_model_dir: Path, tmp_path: Path, tamper, message: str
) -> None:
    step_dir = Path(save_checkpoint(str(tmp_path), 1, trained, {}, keep_last=1))
    tamper(step_dir)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(str(step_dir), build_trainer(tiny_model_dir, 1))


def test_list_shows_good_checkpoints_beside_one_with_a_truncated_manifest(
    trained: PPOTrainer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_checkpoint(str(tmp_path), 1, trained, {}, keep_last=3)
    broken = Path(save_checkpoint(str(tmp_path), 2, trained, {}, keep_last=3))
    (broken / MANIFEST).write_text((broken / MANIFEST).read_text()[:40])
    infos = list_checkpoints(str(tmp_path))
    assert [(info.step, info.problem is None) for info in infos] == [(1, True), (2, False)]
    assert latest_checkpoint(str(tmp_path)).endswith("step-00000001")
    assert rlfleet(["checkpoints", "list", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "step-00000001" in out and "2\tUNUSABLE\t" in out and "not valid JSON" in out


def test_no_checkpoint_is_a_clear_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    assert latest_checkpoint(str(tmp_path)) is None
    assert list_checkpoints(str(tmp_path)) == []
    with pytest.raises(CheckpointError, match="no committed checkpoint under"):
        load_checkpoint(str(tmp_path), build_trainer(tiny_model_dir, 1))


def test_background_upload_snapshots_the_weights_at_save(
    trained: PPOTrainer, tiny_model_dir: Path, s3_env: S3Server, tmp_path: Path
) -> None:
    """Training goes on while the upload runs; the checkpoint holds the weights at save()."""
    uri = f"s3://{s3_env.bucket}/background"
    at_save = weights(trained)
    with CheckpointSaver(uri, keep_last=2, staging_dir=tmp_path / "staging") as saver:
        assert saver.save(1, trained, {"step": 1}) == f"{uri}/step-00000001"
        trained.step(*ppo_step_batch(2))
        assert saver.wait() == f"{uri}/step-00000001"
        saver.save(2, trained, {"step": 2})
    assert list(tmp_path.joinpath("staging").iterdir()) == []
    assert [info.step for info in list_checkpoints(uri)] == [1, 2]

    restored = build_trainer(tiny_model_dir, init_seed=1)
    assert load_checkpoint(f"{uri}/step-1", restored) == {"step": 1}
    assert_same_weights(weights(restored), at_save)


def test_endpoint_comes_from_the_checkpoint_config(
    trained: PPOTrainer, s3_env: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    config = CheckpointConfig(s3_endpoint_override=s3_env.endpoint, local_copy_dir=None)
    uri = f"s3://{s3_env.bucket}/configured"
    save_checkpoint(uri, 5, trained, {}, keep_last=1, config=config)
    assert latest_checkpoint(uri, config=config) == f"{uri}/step-00000005"


def test_wrong_credentials_fail_before_anything_is_written(
    trained: PPOTrainer, s3_env: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    with pytest.raises(StorageCredentialsError, match="AWS_SECRET_ACCESS_KEY"):
        save_checkpoint(f"s3://{s3_env.bucket}/denied", 1, trained, {}, keep_last=1)


def test_cli_lists_and_pulls_from_s3(
    trained: PPOTrainer, s3_env: S3Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = f"s3://{s3_env.bucket}/cli"
    for step in (10, 20):
        save_checkpoint(uri, step, trained, {"step": step}, keep_last=2)
    capsys.readouterr()

    assert rlfleet(["checkpoints", "list", uri]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split("\t")[0] for line in lines] == ["10", "20"]
    assert lines[1].endswith(f"{uri}/step-00000020")

    assert rlfleet(["checkpoints", "pull", f"{uri}/step-10", str(tmp_path / "ten")]) == 0
    assert json.loads((tmp_path / "ten" / "job_state.json").read_text()) == {"step": 10}
    assert rlfleet(["checkpoints", "pull", uri, str(tmp_path / "latest")]) == 0
    assert capsys.readouterr().out.split()[-1] == str(tmp_path / "latest")
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "latest" / "policy")
    assert_same_weights(policy.state_dict(), trained.model.pretrained_model.state_dict())

    assert rlfleet(["checkpoints", "pull", f"{uri}/step-15", str(tmp_path / "x")]) == 1
    assert "step-00000015 is not a committed checkpoint" in capsys.readouterr().err


def test_cli_reports_missing_bucket(s3_env: S3Server, capsys: pytest.CaptureFixture[str]):
    assert rlfleet(["checkpoints", "list", "s3://no-such-bucket/run"]) == 1
    assert "bucket 'no-such-bucket'" in capsys.readouterr().err


def test_pull_verifies_into_a_new_directory(trained: PPOTrainer, tmp_path: Path) -> None:
    save_checkpoint(str(tmp_path / "ckpt"), 1, trained, {}, keep_last=1)
    pulled = pull_checkpoint(str(tmp_path / "ckpt"), tmp_path / "pulled")
    assert (pulled / MANIFEST).is_file()
    with pytest.raises(FileExistsError, match="not empty"):
        pull_checkpoint(str(tmp_path / "ckpt"), pulled)


# ----------------------------------------------------------------------------------------------
# A critic-free trainer: a plain causal LM, no value head


def build_critic_free_trainer(model_dir: Path) -> CriticFreeTrainer:
    """A GRPO trainer on the tiny model, its reference the model as loaded (as in a job, where a
    resumed run builds it from the same model path)."""
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = CriticFreeConfig(batch_size=BATCH, mini_batch_size=2, num_iterations=2, beta=0.04)
    return CriticFreeTrainer(config, model, tokenizer=AutoTokenizer.from_pretrained(model_dir))


GROUP_IDS = [0, 0, 1, 1]


def test_critic_free_round_trip_then_one_more_step_gives_identical_training(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    trained = build_critic_free_trainer(tiny_model_dir)
    trained.step(*ppo_step_batch(1), GROUP_IDS)
    step_dir = Path(save_checkpoint(str(tmp_path), 1, trained, JOB_STATE, keep_last=1))
    manifest = json.loads((step_dir / MANIFEST).read_text())
    assert manifest["value_head"] is False and "value_head.safetensors" not in manifest["files"]

    fresh = build_critic_free_trainer(tiny_model_dir)
    before, after = weights(fresh), weights(trained)
    assert any(not torch.equal(before[name], after[name]) for name in before)
    assert load_checkpoint(str(tmp_path), fresh) == JOB_STATE
    assert_same_weights(weights(fresh), weights(trained))
    assert_same_optimizer(fresh, trained)
    assert fresh.training_state() == trained.training_state()

    stats_a = trained.step(*ppo_step_batch(2), GROUP_IDS)
    stats_b = fresh.step(*ppo_step_batch(2), GROUP_IDS)
    assert_same_weights(weights(fresh), weights(trained))
    assert stats_a["loss"] == stats_b["loss"] and stats_a["kl"] == stats_b["kl"]
    assert fresh.training_state() == trained.training_state()


def test_a_checkpoint_loads_only_into_a_trainer_of_its_kind(
    trained: PPOTrainer, tiny_model_dir: Path, tmp_path: Path
) -> None:
    critic_free = build_critic_free_trainer(tiny_model_dir)
    save_checkpoint(str(tmp_path / "ppo"), 1, trained, {}, keep_last=1)
    save_checkpoint(str(tmp_path / "critic_free"), 1, critic_free, {}, keep_last=1)
    with pytest.raises(CheckpointError, match="has a value head but the trainer's model has none"):
        load_checkpoint(str(tmp_path / "ppo"), build_critic_free_trainer(tiny_model_dir))
    with pytest.raises(CheckpointError, match="has no value head but the trainer's model has one"):
        load_checkpoint(str(tmp_path / "critic_free"), build_trainer(tiny_model_dir, 1))


# ----------------------------------------------------------------------------------------------
# Format 1 (whole tensors in policy/, the optimizer keyed by position) still loads


def write_format_1_checkpoint(step_dir: Path, trainer: PPOTrainer, job_state: dict) -> None:
    """A checkpoint as rlfleet-checkpoint/1 wrote it."""
    step_dir.mkdir(parents=True)
    trainer.model.pretrained_model.save_pretrained(step_dir / "policy")
    trainer.tokenizer.save_pretrained(step_dir / "policy")
    value_head = {k: v.contiguous() for k, v in trainer.model.v_head.state_dict().items()}
    save_file(value_head, str(step_dir / "value_head.safetensors"))
    save_state(step_dir, "optimizer", trainer.optimizer.state_dict())
    save_state(step_dir, "lr_scheduler", trainer.lr_scheduler.state_dict())
    save_state(step_dir, "training_state", trainer.training_state())
    save_state(step_dir, "job_state", job_state)
    files = {
        path.relative_to(step_dir).as_posix(): {
            "size": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }
        for path in step_dir.rglob("*")
        if path.is_file()
    }
    manifest = {"format": "rlfleet-checkpoint/1", "step": 1, "created": "", "files": files}
    (step_dir / MANIFEST).write_text(json.dumps(manifest))


def test_a_format_1_checkpoint_still_loads(
    trained: PPOTrainer, tiny_model_dir: Path, tmp_path: Path
) -> None:
    write_format_1_checkpoint(tmp_path / "step-00000001", trained, JOB_STATE)
    assert [info.step for info in list_checkpoints(str(tmp_path))] == [1]
    fresh = build_trainer(tiny_model_dir, init_seed=1)
    assert load_checkpoint(str(tmp_path), fresh) == JOB_STATE
    assert_same_weights(weights(fresh), weights(trained))
    assert_same_optimizer(fresh, trained)
    assert fresh.lr_scheduler.state_dict() == trained.lr_scheduler.state_dict()
    assert fresh.training_state() == trained.training_state()
