"""Checkpoints that the rlfleet of commit 3acc500 wrote (before the layout by role) still load.

tests/checkpoint/data/make_old_checkpoint.py saved them with that tree's code (a PPO trainer with
a schedule after two steps, a GRPO one after a step, a PPO one training LoRA adapters) and
recorded what each trainer held right after the save. A trainer built fresh with today's code
holds exactly that once restored, resumes only with the job's identity, and trains on.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from rlfleet.checkpoint.command import pull_checkpoint
from rlfleet.checkpoint.identity import CheckpointIdentity, model_fingerprint
from rlfleet.checkpoint.load import list_checkpoints, load_checkpoint
from rlfleet.checkpoint.shards import CheckpointError
from rlfleet.trainers.lora import add_adapters

DATA = Path(__file__).resolve().parent / "data"
OLD = DATA / "old-main"


def script() -> ModuleType:
    """make_old_checkpoint.py, whose trainer builder and digest serve old and new code alike."""
    spec = importlib.util.spec_from_file_location(
        "make_old_checkpoint", DATA / "make_old_checkpoint.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


old = script()
EXPECTED = json.loads((OLD / "expected.json").read_text())
PARTS = ("model", "optimizer", "lr_scheduler", "training_state")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The old jobs' model directory (its config files) with fresh random weights of that shape:
    what a checkpoint trained comes back from the checkpoint, and LoRA's frozen base weights are
    not compared."""
    directory = tmp_path_factory.mktemp("old-model")
    torch.manual_seed(1234)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(OLD / "model")).save_pretrained(
        directory
    )
    for name in old.MODEL_FILES:
        shutil.copyfile(OLD / "model" / name, directory / name)
    return directory


def identity_of(kind: str, model_dir: Path) -> CheckpointIdentity:
    """The identity today's learner expects of the old job (the fingerprint of the model
    directory as it computes it now)."""
    recorded = EXPECTED[kind]["identity"]
    return CheckpointIdentity(**{**recorded, "fingerprint": model_fingerprint(str(model_dir))})


@pytest.mark.parametrize("kind", sorted(old.KINDS))
def test_an_old_checkpoint_restores_what_its_trainer_held(
    kind: str, model_dir: Path, tmp_path: Path
) -> None:
    expected = EXPECTED[kind]
    root = tmp_path / kind
    shutil.copytree(OLD / kind, root)
    trainer = old.build_trainer(kind, model_dir, add_adapters)
    fresh = old.trainer_digest(trainer)
    parts = [part for part in PARTS if expected["trainer"][part] is not None]
    assert [part for part in parts if fresh[part] == expected["trainer"][part]] == []

    job_state = load_checkpoint(str(root), trainer, expect=identity_of(kind, model_dir))

    assert job_state == expected["job_state"]
    restored = old.trainer_digest(trainer)
    for part in PARTS:
        assert restored[part] == expected["trainer"][part], part
    vocab_size = AutoConfig.from_pretrained(model_dir).vocab_size
    batch = old.rollouts(expected["step"] + 1, vocab_size)
    if kind == "grpo":
        trainer.step(*batch, old.GROUP_IDS)
    else:
        trainer.step(*batch)
    assert old.trainer_digest(trainer)["model"] != restored["model"]
    assert all(torch.isfinite(parameter).all() for parameter in trainer.model.parameters())


def test_an_old_checkpoint_is_refused_to_another_job(model_dir: Path) -> None:
    other = CheckpointIdentity(**{**identity_of("ppo", model_dir).to_json(), "job": "another"})
    trainer = old.build_trainer("ppo", model_dir, add_adapters)
    with pytest.raises(CheckpointError, match="was written by job 'old-main-ppo'"):
        load_checkpoint(str(OLD / "ppo"), trainer, expect=other)


@pytest.mark.parametrize("kind", sorted(old.KINDS))
def test_an_old_checkpoint_is_listed_and_pulls_verified(kind: str, tmp_path: Path) -> None:
    [info] = list_checkpoints(str(OLD / kind))
    assert (info.step, info.problem) == (old.KINDS[kind], None)
    pulled = pull_checkpoint(str(OLD / kind), tmp_path / "pulled")
    manifest = json.loads((pulled / "MANIFEST.json").read_text())
    assert manifest["format"] == "rlfleet-checkpoint/2"
    assert AutoModelForCausalLM.from_pretrained(pulled / "policy").config.n_embd == 32
