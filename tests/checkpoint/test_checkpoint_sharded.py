"""Checkpoints of a model sharded with FSDP2 over 2 gloo ranks (spawned processes), resumed onto
2 ranks, onto 1 plain trainer, and a plain trainer's onto 2 ranks: an exact copy each way, on
local disk and on S3. The commit waits for every rank's files; the manifest records the job and
model it belongs to. The learner's own PPOTrainer on 2 ranks resumes bit for bit (slow).

The trainer here is the smallest thing a checkpoint needs (model, optimizer, scheduler,
tokenizer, training state), sharded as the learner's ranks shard theirs: each transformer block,
the value head, the root.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from support.batches import ppo_step_batch
from support.ports import free_ports
from support.spawned import run_spawned
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlfleet.checkpoint import load
from rlfleet.checkpoint import saver as saver_module
from rlfleet.checkpoint.commit import MANIFEST, RankFiles
from rlfleet.checkpoint.export import write_exports
from rlfleet.checkpoint.identity import CheckpointIdentity, model_fingerprint
from rlfleet.checkpoint.load import latest_checkpoint, list_checkpoints, load_checkpoint
from rlfleet.checkpoint.saver import CheckpointSaver, save_checkpoint
from rlfleet.checkpoint.shards import CheckpointError
from rlfleet.checkpoint.state import model_tensors, optimizer_state
from rlfleet.common.config import PPOConfig
from rlfleet.common.storage import open_storage
from rlfleet.trainers.distributed import DataParallel, full_state
from rlfleet.trainers.ppo import PPOTrainer
from rlfleet.trainers.value_head import AutoModelForCausalLMWithValueHead

pytest_plugins = ["support.s3_server"]

if TYPE_CHECKING:
    from support.s3_server import S3Server

TIMEOUT_S = 180.0
KEEP = 5
AFTER_A_STEP_ATOL = 1e-7
"""One step on 2 ranks against the plain trainer from the same state: measured at most 1.9e-9
apart in the weights and 7.5e-9 in Adam's moments (summation order); a step moves the weights by
1e-3 and more."""
EXPORT_FILE_BYTES = 60_000
"""Small enough that the gathered export of the tiny model spans several files."""


class TinyTrainer:
    """A tiny GPT-2 with a value head, Adam and a StepLR schedule; sharded with FSDP2 over the
    default process group when ``sharded``. ``init_seed`` picks the value head's initial
    weights."""

    def __init__(self, model_dir: Path, *, sharded: bool, init_seed: int) -> None:
        torch.manual_seed(init_seed)
        self.model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir).eval()
        if sharded:
            for block in self.model.pretrained_model.transformer.h:
                fully_shard(block)
            fully_shard(self.model.v_head)
            fully_shard(self.model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-2)
        self.lr_scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, 1, gamma=0.5)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.steps = 0

    def step(self, seed: int) -> None:
        tokens = torch.randint(1, 700, (2, 6), generator=torch.Generator().manual_seed(seed))
        logits, _, values = self.model(input_ids=tokens)
        loss = logits.log_softmax(-1)[..., 5].mean() + values.square().mean()
        loss.backward()
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad()
        self.steps += 1

    def training_state(self) -> dict[str, Any]:
        return {"steps": self.steps}

    def load_training_state(self, state: dict[str, Any]) -> None:
        self.steps = state["steps"]


def snapshot(trainer: TinyTrainer) -> dict[str, torch.Tensor]:
    """The trainer's model and optimizer tensors whole (collective when sharded), plus the
    scheduler's learning rate and the training state as tensors."""

    def whole(tensor: torch.Tensor) -> torch.Tensor:
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        return full.detach().clone()

    tensors = {f"model/{name}": whole(t) for name, t in model_tensors(trainer.model).items()}
    state = optimizer_state(trainer.model, trainer.optimizer)
    for name, slots in state["state"].items():
        for slot, value in slots.items():
            tensors[f"optimizer/{name}/{slot}"] = whole(value)
    tensors["lr"] = torch.tensor([g["lr"] for g in state["param_groups"]], dtype=torch.float64)
    tensors["steps"] = torch.tensor(trainer.steps)
    return tensors


def identity_for(model_dir: Path, job: str = "sharded-test") -> CheckpointIdentity:
    return CheckpointIdentity(job, "ppo", str(model_dir), model_fingerprint(str(model_dir)))


def save_and_load_on_rank(
    rank: int, model_dir: Path, out: Path, s3_uri: str, s3_env: dict[str, str], plain_uri: str
) -> None:
    """The saves below; a copy of the checkpoints before step 2 is committed (``uncommitted``);
    rank 0 commits step 2 with both ranks' parts; then both ranks load step 2 and the plain
    checkpoint ``plain_uri`` into fresh sharded trainers."""
    os.environ.update(s3_env)
    uri = str(out / "checkpoints")
    save_on_rank(rank, model_dir, uri, out, s3_uri)
    dist.barrier()
    if rank == 0:
        shutil.copytree(uri, out / "uncommitted")
        saver = CheckpointSaver(uri, keep_last=KEEP, identity=identity_for(model_dir))
        saver.commit(parts_of(out))
    dist.barrier()
    load_on_rank(rank, model_dir, [f"{uri}/step-00000002", plain_uri], out)


def save_on_rank(rank: int, model_dir: Path, uri: str, out: Path, s3_uri: str) -> None:
    """Step 1 committed through ``save_checkpoint`` (also to ``s3_uri``); step 2 saved by each
    rank but not committed (its parts go to ``out``); then one more training step; then a save
    whose rank 1 fails."""
    trainer = TinyTrainer(model_dir, sharded=True, init_seed=0)
    trainer.step(1)
    save_checkpoint(uri, 1, trainer, {"step": 1}, keep_last=KEEP)
    save_checkpoint(s3_uri, 1, trainer, {"step": 1}, keep_last=KEEP)
    trainer.step(2)
    with CheckpointSaver(uri, keep_last=KEEP, auto_commit=False) as saver:
        saver.save(2, trainer, {"step": 2})
        (out / f"part-{rank}.json").write_text(json.dumps(asdict(saver.stored_files())))
    write_exports(out / "export" if rank == 0 else None, trainer, EXPORT_FILE_BYTES)
    saved = snapshot(trainer)
    trainer.step(3)
    after = snapshot(trainer)
    if rank == 0:
        save_file(saved, str(out / "saved.safetensors"))
        save_file(after, str(out / "after.safetensors"))
    fail_rank_1_store(rank, uri, trainer, out)


def fail_rank_1_store(rank: int, uri: str, trainer: TinyTrainer, out: Path) -> None:
    """Checkpoint 4 with rank 1's upload failing: every rank must raise, nothing committed."""
    if rank == 1:

        def broken(*args: Any, **kwargs: Any) -> RankFiles:
            raise OSError("disk on fire")

        saver_module.store_rank_files = broken
    try:
        save_checkpoint(uri, 4, trainer, {"step": 4}, keep_last=KEEP)
        outcome = "committed"
    except CheckpointError as error:
        outcome = str(error)
    (out / f"failed-save-{rank}.txt").write_text(outcome)


def load_on_rank(rank: int, model_dir: Path, uris: list[str], out: Path) -> None:
    """Each checkpoint of ``uris`` into a fresh sharded trainer: its state (and the files this
    rank opened), then one more step."""
    for index, uri in enumerate(uris):
        trainer = TinyTrainer(model_dir, sharded=True, init_seed=1)
        with record_opened_files() as opened:
            job_state = load_checkpoint(uri, trainer)
        (out / f"opened-{index}-rank-{rank}.json").write_text(json.dumps(opened))
        loaded = snapshot(trainer)
        trainer.step(3)
        after = snapshot(trainer)
        if rank == 0:
            save_file(loaded, str(out / f"loaded-{index}.safetensors"))
            save_file(after, str(out / f"after-{index}.safetensors"))
            (out / f"job-state-{index}.json").write_text(json.dumps(job_state))


def ppo_on_rank(rank: int, model_dir: Path, out: Path) -> None:
    """The learner's PPOTrainer on this rank: a step, a checkpoint, a step; and a fresh trainer
    resumed from that checkpoint taking the same step."""
    parallel = DataParallel.current(torch.device("cpu"))
    trainer = ppo_trainer(model_dir, parallel)
    trainer.step(*ppo_step_batch(1))
    save_checkpoint(str(out / "checkpoints"), 1, trainer, {"step": 1}, keep_last=1)
    saved, saved_state = whole_weights(trainer), trainer.training_state()
    trainer.step(*ppo_step_batch(2))
    after = whole_weights(trainer)
    resumed = ppo_trainer(model_dir, parallel)
    assert load_checkpoint(str(out / "checkpoints"), resumed) == {"step": 1}
    resumed.step(*ppo_step_batch(2))
    after_resumed = whole_weights(resumed)
    if rank == 0:
        for name, weights in ("saved", saved), ("after", after), ("resumed", after_resumed):
            save_file(weights, str(out / f"{name}.safetensors"))
        (out / "training_state.json").write_text(json.dumps(saved_state))


def ppo_trainer(model_dir: Path, parallel: DataParallel | None) -> PPOTrainer:
    model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir)
    config = PPOConfig(batch_size=4, mini_batch_size=2, ppo_epochs=2, learning_rate=1e-3, seed=0)
    return PPOTrainer(config, model, parallel=parallel)


def whole_weights(trainer: PPOTrainer) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in full_state(trainer.model)}


@contextmanager
def record_opened_files() -> Iterator[list[str]]:
    """The checkpoint files that loads open in the block (each verified once, then read)."""
    opened: list[str] = []
    path = load.CheckpointFiles.path

    def recording(files: load.CheckpointFiles, relative: str) -> Path:
        opened.append(relative)
        return path(files, relative)

    load.CheckpointFiles.path = recording
    try:
        yield opened
    finally:
        load.CheckpointFiles.path = path


TASKS = {"save_and_load": save_and_load_on_rank, "ppo": ppo_on_rank}


def run_rank(rank: int, world_size: int, port: int, task: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        TASKS[task](rank, *args)
    finally:
        dist.destroy_process_group()


def spawn_ranks(world_size: int, task: str, *args: Any) -> None:
    """``task`` on ``world_size`` spawned gloo ranks, killed if not done in ``TIMEOUT_S``."""
    (port,) = free_ports(1)
    run_spawned(run_rank, (world_size, port, task, args), world_size, TIMEOUT_S, task)


S3_PREFIX = "sharded-checkpoints"


@pytest.fixture(scope="module")
def plain_checkpoint(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain trainer's checkpoint (rank 0 of 1) after two steps, and its state."""
    root = tmp_path_factory.mktemp("plain")
    trainer = TinyTrainer(tiny_model_dir, sharded=False, init_seed=0)
    trainer.step(1)
    trainer.step(2)
    save_checkpoint(str(root / "checkpoints"), 2, trainer, {"step": 2}, keep_last=1)
    save_file(snapshot(trainer), str(root / "saved.safetensors"))
    trainer.step(3)
    save_file(snapshot(trainer), str(root / "after.safetensors"))
    return root


@pytest.fixture(scope="module")
def sharded_run(
    tiny_model_dir: Path,
    plain_checkpoint: Path,
    tmp_path_factory: pytest.TempPathFactory,
    s3_server: S3Server,
) -> Path:
    """The 2-rank run: ``checkpoints/`` (steps 1 and 2 committed), ``uncommitted/`` (step 2
    stored but not committed), step 1 also on S3, and what the ranks reported and loaded
    (``*-0``: the 2-rank checkpoint, ``*-1``: the plain one)."""
    out = tmp_path_factory.mktemp("sharded")
    s3_uri = f"s3://{s3_server.bucket}/{S3_PREFIX}"
    plain_uri = str(plain_checkpoint / "checkpoints")
    spawn_ranks(2, "save_and_load", tiny_model_dir, out, s3_uri, s3_server.env(), plain_uri)
    return out


def parts_of(run: Path) -> list[RankFiles]:
    return [RankFiles(**json.loads((run / f"part-{r}.json").read_text())) for r in (0, 1)]


def assert_identical(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    assert [name for name in expected if not torch.equal(actual[name], expected[name])] == []


def test_two_rank_checkpoint_resumes_exactly_on_two_ranks(
    sharded_run: Path,
) -> None:
    saved = load_file(str(sharded_run / "saved.safetensors"))
    assert_identical(load_file(str(sharded_run / "loaded-0.safetensors")), saved)
    assert json.loads((sharded_run / "job-state-0.json").read_text()) == {"step": 2}
    after = load_file(str(sharded_run / "after.safetensors"))
    assert_identical(load_file(str(sharded_run / "after-0.safetensors")), after)
    moved = [name for name in saved if name.startswith("model/")]
    assert any(not torch.equal(saved[name], after[name]) for name in moved)


def test_two_rank_checkpoint_resumes_exactly_on_a_plain_trainer(
    sharded_run: Path, tiny_model_dir: Path
) -> None:
    trainer = TinyTrainer(tiny_model_dir, sharded=False, init_seed=1)
    before = snapshot(trainer)
    saved = load_file(str(sharded_run / "saved.safetensors"))
    assert any(not torch.equal(before[name], saved[name]) for name in before if name in saved)
    assert load_checkpoint(str(sharded_run / "checkpoints"), trainer) == {"step": 2}
    assert_identical(snapshot(trainer), saved)
    assert trainer.lr_scheduler.get_last_lr() == [saved["lr"].item()]


def test_plain_checkpoint_resumes_exactly_on_two_ranks(
    plain_checkpoint: Path, sharded_run: Path
) -> None:
    saved = load_file(str(plain_checkpoint / "saved.safetensors"))
    assert_identical(load_file(str(sharded_run / "loaded-1.safetensors")), saved)
    after = load_file(str(plain_checkpoint / "after.safetensors"))
    resumed = load_file(str(sharded_run / "after-1.safetensors"))
    torch.testing.assert_close(resumed, after, rtol=0, atol=AFTER_A_STEP_ATOL)


def test_two_ranks_save_to_s3_what_they_save_locally(
    sharded_run: Path, tiny_model_dir: Path, s3_env: S3Server
) -> None:
    """Each rank uploads its own files; the committed checkpoint is the local one, file for
    file, and loads the same."""
    s3_uri = f"s3://{s3_env.bucket}/{S3_PREFIX}"
    assert [info.step for info in list_checkpoints(s3_uri)] == [1]
    remote = json.loads(open_storage(s3_uri).read_bytes(f"step-00000001/{MANIFEST}"))
    local = json.loads((sharded_run / "checkpoints" / "step-00000001" / MANIFEST).read_text())
    assert remote["files"] == local["files"] and remote["ranks"] == 2
    from_s3 = TinyTrainer(tiny_model_dir, sharded=False, init_seed=1)
    from_disk = TinyTrainer(tiny_model_dir, sharded=False, init_seed=2)
    assert load_checkpoint(s3_uri, from_s3) == {"step": 1}
    assert load_checkpoint(str(sharded_run / "checkpoints" / "step-1"), from_disk) == {"step": 1}
    assert_identical(snapshot(from_s3), snapshot(from_disk))


def test_a_rank_opens_only_the_files_that_hold_its_shards(sharded_run: Path) -> None:
    """Same layout: rank 1 reads its own model file, and rank 0's optimizer file only for what
    rank 0 alone stored (Adam's step counts). From one rank's files, both ranks read that one."""
    opened = {
        (index, rank): set(
            json.loads((sharded_run / f"opened-{index}-rank-{rank}.json").read_text())
        )
        for index in (0, 1)
        for rank in (0, 1)
    }
    assert "model.rank-00001-of-00002.safetensors" in opened[0, 1]
    assert "model.rank-00000-of-00002.safetensors" not in opened[0, 1]
    assert "model.rank-00001-of-00002.safetensors" not in opened[0, 0]
    assert "optimizer.rank-00000-of-00002.safetensors" in opened[0, 1]
    assert not any(name.startswith("policy/") for name in opened[0, 0] | opened[0, 1])
    assert "model.rank-00000-of-00001.safetensors" in opened[1, 0] & opened[1, 1]


def test_each_rank_writes_only_its_shards(sharded_run: Path) -> None:
    """Rank 1's file holds the second half of a sharded weight; a replicated tensor (Adam's step)
    is stored once, by rank 0."""
    step_dir = sharded_run / "checkpoints" / "step-00000002"
    manifest = json.loads((step_dir / MANIFEST).read_text())
    assert manifest["ranks"] == 2 and manifest["format"] == "rlfleet-checkpoint/2"
    index = json.loads((step_dir / "model.rank-00001-of-00002.json").read_text())["tensors"]
    wte = index["transformer.wte.weight"]
    assert wte["shape"] == [702, 64] and wte["offsets"] == [351, 0] and wte["sizes"] == [351, 64]
    assert "lm_head.weight" not in index
    rank_1 = load_file(str(step_dir / "optimizer.rank-00001-of-00002.safetensors"))
    rank_0 = load_file(str(step_dir / "optimizer.rank-00000-of-00002.safetensors"))
    assert not any(name.endswith(".step") for name in rank_1)
    assert any(name.endswith(".step") for name in rank_0)


def test_policy_export_of_a_sharded_model_loads_with_auto_model(sharded_run: Path) -> None:
    saved = load_file(str(sharded_run / "saved.safetensors"))
    step_dir = sharded_run / "checkpoints" / "step-00000002"
    for policy_dir in (step_dir / "policy", sharded_run / "export" / "policy"):
        policy = AutoModelForCausalLM.from_pretrained(policy_dir)
        weights = policy.state_dict()
        assert torch.equal(weights.pop("lm_head.weight"), saved["model/transformer.wte.weight"])
        assert_identical(
            {f"model/{name}": tensor for name, tensor in weights.items()},
            {
                name: tensor
                for name, tensor in saved.items()
                if name.startswith("model/") and not name.startswith("model/v_head.")
            },
        )
        AutoTokenizer.from_pretrained(policy_dir)
    value_head = load_file(str(step_dir / "value_head.safetensors"))
    assert torch.equal(value_head["summary.weight"], saved["model/v_head.summary.weight"])
    split = sorted(p.name for p in (sharded_run / "export" / "policy").glob("*.safetensors"))
    assert len(split) > 1 and (sharded_run / "export/policy/model.safetensors.index.json").is_file()


def test_manifest_is_committed_only_with_every_rank_files(
    sharded_run: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Step 2's files of both ranks are in, its manifest is not: step 1 stays the latest until
    rank 0 commits with both ranks' files, all present."""
    root = tmp_path / "checkpoints"
    shutil.copytree(sharded_run / "uncommitted", root)
    assert [info.step for info in list_checkpoints(str(root))] == [1]
    assert latest_checkpoint(str(root)) == f"{root}/step-00000001"
    trainer = TinyTrainer(tiny_model_dir, sharded=False, init_seed=1)
    assert load_checkpoint(str(root), trainer) == {"step": 1}

    rank_0, rank_1 = parts_of(sharded_run)
    saver = CheckpointSaver(str(root), keep_last=KEEP)
    with pytest.raises(CheckpointError, match="one RankFiles per rank"):
        saver.commit([rank_0])
    with pytest.raises(CheckpointError, match="one RankFiles per rank"):
        saver.commit([rank_0, rank_0])
    (root / "step-00000002" / "optimizer.rank-00001-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"incomplete: \['optimizer.rank-00001"):
        saver.commit([rank_0, rank_1])
    assert not (root / "step-00000002" / MANIFEST).exists()
    assert latest_checkpoint(str(root)) == f"{root}/step-00000001"


def test_a_rank_that_fails_to_store_fails_the_save_on_every_rank(sharded_run: Path) -> None:
    for rank in (0, 1):
        outcome = (sharded_run / f"failed-save-{rank}.txt").read_text()
        assert "checkpoint not committed: rank 1: disk on fire" in outcome
    storage = open_storage(str(sharded_run / "checkpoints"))
    assert not storage.exists(f"step-00000004/{MANIFEST}")
    assert latest_checkpoint(str(sharded_run / "checkpoints")).endswith("step-00000002")


# ----------------------------------------------------------------------------------------------
# The job and model a checkpoint belongs to


def copy_model(model_dir: Path, destination: Path, **config_changes: Any) -> Path:
    shutil.copytree(model_dir, destination)
    config = json.loads((destination / "config.json").read_text())
    config.update(config_changes)
    (destination / "config.json").write_text(json.dumps(config, indent=2))
    return destination


def test_model_fingerprint_is_stable_and_tells_models_apart(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    fingerprint = model_fingerprint(str(tiny_model_dir))
    assert len(fingerprint) == 64 and fingerprint == model_fingerprint(str(tiny_model_dir))
    resaved = copy_model(tiny_model_dir, tmp_path / "resaved", transformers_version="9.9.9")
    assert model_fingerprint(str(resaved)) == fingerprint
    other = copy_model(tiny_model_dir, tmp_path / "other", layer_norm_epsilon=1e-6)
    assert model_fingerprint(str(other)) != fingerprint
    cut = copy_model(tiny_model_dir, tmp_path / "cut")
    weights = load_file(str(cut / "model.safetensors"))
    weights.pop(next(iter(weights)))
    save_file(weights, str(cut / "model.safetensors"))
    assert model_fingerprint(str(cut)) != fingerprint
    with pytest.raises(CheckpointError, match="no config.json"):
        model_fingerprint(str(tmp_path))


@pytest.fixture
def with_identity(tiny_model_dir: Path, tmp_path: Path) -> str:
    trainer = TinyTrainer(tiny_model_dir, sharded=False, init_seed=0)
    identity = identity_for(tiny_model_dir, job="job-a")
    return save_checkpoint(
        str(tmp_path / "ckpt"), 4, trainer, {"step": 4}, keep_last=1, identity=identity
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"fingerprint": "ab12" * 16, "model": "/models/other"},
            r"step-00000004 was written for model \S+ \(fingerprint [0-9a-f]{12}\.\.\), this job "
            r"trains /models/other \(fingerprint ab12ab12ab12\.\.\); point checkpoint.uri "
            "elsewhere or use the same model",
        ),
        ({"algorithm": "grpo"}, "written by a ppo job, this job runs grpo; .* algorithm: ppo"),
        ({"job": "job-b"}, "written by job 'job-a', this job is 'job-b'; .* set name: job-a"),
    ],
    ids=["model", "algorithm", "job"],
)
def test_a_checkpoint_of_another_job_or_model_is_refused(
    with_identity: str, tiny_model_dir: Path, change: dict[str, str], message: str
) -> None:
    expect = CheckpointIdentity(**{**asdict(identity_for(tiny_model_dir, "job-a")), **change})
    trainer = TinyTrainer(tiny_model_dir, sharded=False, init_seed=1)
    before = snapshot(trainer)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(with_identity, trainer, expect=expect)
    assert_identical(snapshot(trainer), before)
    with pytest.raises(CheckpointError, match=message):
        load.resolve_resume(str(Path(with_identity).parent), expect=expect)


def test_the_same_job_resumes_and_a_checkpoint_without_identity_is_refused(
    with_identity: str, tiny_model_dir: Path, tmp_path: Path
) -> None:
    expect = identity_for(tiny_model_dir, job="job-a")
    root = str(Path(with_identity).parent)
    assert load.resolve_resume(root, expect=expect) == with_identity
    trainer = TinyTrainer(tiny_model_dir, sharded=False, init_seed=1)
    assert load_checkpoint(with_identity, trainer, expect=expect) == {"step": 4}

    anonymous = save_checkpoint(str(tmp_path / "anon"), 1, trainer, {}, keep_last=1)
    with pytest.raises(CheckpointError, match="records no job and model fingerprint"):
        load_checkpoint(anonymous, trainer, expect=expect)


# ----------------------------------------------------------------------------------------------
# The learner's own trainer (trainers/distributed.py's FSDP2 layout)


@pytest.mark.slow
def test_ppo_trainer_on_two_ranks_resumes_exactly(tiny_model_dir: Path, tmp_path: Path) -> None:
    """PPOTrainer sharded over 2 ranks: resumed on 2 ranks, the next step is bit-identical; the
    checkpoint loads into the plain trainer as an exact copy, training state included."""
    spawn_ranks(2, "ppo", tiny_model_dir, tmp_path)
    saved, after, resumed = (
        load_file(str(tmp_path / f"{name}.safetensors")) for name in ("saved", "after", "resumed")
    )
    assert_identical(resumed, after)
    assert any(not torch.equal(saved[name], after[name]) for name in saved)
    plain = ppo_trainer(tiny_model_dir, None)
    assert load_checkpoint(str(tmp_path / "checkpoints"), plain) == {"step": 1}
    assert_identical(whole_weights(plain), saved)
    saved_state = json.loads((tmp_path / "training_state.json").read_text())
    assert json.loads(json.dumps(plain.training_state())) == saved_state
    assert saved_state["current_step"] == 1
