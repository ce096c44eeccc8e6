"""Checkpoints of a training run on local disk or in object storage, committed by a manifest:
the format, writing a rank's files, and committing them.

A checkpoint is the directory ``<uri>/step-<8 digits>/`` (format ``rlfleet-checkpoint/2``)::

    model.rank-<r>-of-<N>.safetensors/.json      the model's tensors (value head included) as the
                                                 N ranks held them: rank r's shards, and where
                                                 they lie in the full tensors
    optimizer.rank-<r>-of-<N>.safetensors/.json  the optimizer state's tensors, the same way
    optimizer.json               the rest of the optimizer state, keyed by parameter name
    lr_scheduler.json            the scheduler state (only when the trainer has one)
    training_state.json          the trainer's ``training_state()`` (KL controller, RNG, ...)
    job_state.json               what the job loop passed (dataset cursor, policy version, ...)
    policy/                      the policy as a Hugging Face directory (safetensors, config,
                                 tokenizer): ``AutoModelForCausalLM.from_pretrained`` loads it
    value_head.safetensors       the value head's weights (PPO only: the model of a critic-free
                                 trainer is a plain causal LM)
    MANIFEST.json                written last: every file's size and sha256, the number of
                                 ranks, and the job it belongs to (:class:`CheckpointIdentity`)

A plain (unsharded) trainer is rank 0 of 1. A resume reads the per-rank files, onto any number
of ranks (checkpoint/shards.py, checkpoint/load.py): each rank reads only the slices of the files
that overlap its own shards, so the copy is exact; ``policy/`` and ``value_head.safetensors`` are
exports for people and tools (checkpoint/export.py). Checkpoints of the first format,
``rlfleet-checkpoint/1`` (whole tensors in ``policy/``, the optimizer keyed by position), still
load into a plain trainer.

Only a directory with a manifest counts (``list_checkpoints``, ``latest_checkpoint``), so a save
that crashes or is killed half-way leaves the previous checkpoint the latest; the next save of
that step or of a later one removes the debris. Older checkpoints are pruned to ``keep_last``
only after the new manifest is committed. Nothing is pickled: tensors go through safetensors,
everything else through JSON.

Saving from N ranks (the rank group's protocol; ``save_checkpoint`` in checkpoint/saver.py runs
it over torch.distributed):

1. every rank calls ``CheckpointSaver(uri, ..., auto_commit=False).save(step, trainer, state)``
   at once: rank 0 clears debris of that step, a barrier, then each rank writes its own files
   (:func:`write_checkpoint_files`: rank 0 also the exports, gathered tensor by tensor from all
   ranks, and the JSON states); training may go on when it returns;
2. each rank's ``stored_files()`` returns once its files are hashed and fsynced (or uploaded,
   :func:`store_rank_files`): a :class:`RankFiles`;
3. rank 0's ``commit(parts)`` with every rank's :class:`RankFiles` checks that the files are in
   the store with their sizes, writes the manifest, and prunes (:func:`commit_checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from rlfleet.checkpoint.export import POLICY_DIR, VALUE_HEAD_FILE, write_exports
from rlfleet.checkpoint.identity import CheckpointIdentity
from rlfleet.checkpoint.shards import CheckpointError, rank_file_names, write_rank_file
from rlfleet.checkpoint.state import encode_state, model_tensors, optimizer_state, save_state
from rlfleet.common.config import CheckpointConfig
from rlfleet.common.storage import Storage, fsync_dir, join_uri
from rlfleet.trainers.lora import ADAPTER_DIR

FORMAT = "rlfleet-checkpoint/2"
FORMAT_V1 = "rlfleet-checkpoint/1"
MANIFEST = "MANIFEST.json"
MODEL = "model"
OPTIMIZER = "optimizer"
LR_SCHEDULER = "lr_scheduler"
TRAINING_STATE = "training_state"
JOB_STATE = "job_state"
STEP_NAME = re.compile(r"^step-(\d+)$")

REQUIRED_FILES = (
    f"{POLICY_DIR}/config.json",
    f"{OPTIMIZER}.json",
    f"{TRAINING_STATE}.json",
    f"{JOB_STATE}.json",
)
"""Files every checkpoint's manifest must list (besides the policy's ``*.safetensors``, the
per-rank files of format 2, and ``VALUE_HEAD_FILE`` unless the manifest says ``"value_head":
false``)."""


@dataclass(frozen=True)
class RankFiles:
    """The files one rank stored for checkpoint ``step``: relative path -> size and sha256."""

    step: int
    rank: int
    world_size: int
    files: dict[str, dict[str, Any]]


def step_dir_name(step: int) -> str:
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"step-{step:08d}"


def endpoint_of(config: CheckpointConfig | None) -> str | None:
    """The S3 endpoint that ``config`` names (None: the environment's, else AWS)."""
    return config.s3_endpoint_override if config else None


def rank_and_world_size() -> tuple[int, int]:
    """This process's place in the default torch.distributed group (rank 0 of 1 without one)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def write_checkpoint_files(
    directory: Path,
    trainer: Any,
    job_state: dict[str, Any],
    rank: int = 0,
    world_size: int = 1,
) -> list[str]:
    """This rank's files (all of them for one rank) into ``directory``; returns their paths
    relative to it. They are a complete snapshot: training may go on as soon as this returns.
    Every rank calls it at once for a sharded trainer (the policy export is gathered)."""
    directory.mkdir(parents=True, exist_ok=True)
    written = write_rank_file(directory, MODEL, model_tensors(trainer.model), rank, world_size)
    encoded, tensors = encode_state(optimizer_state(trainer.model, trainer.optimizer))
    written += write_rank_file(directory, OPTIMIZER, tensors, rank, world_size)
    written += write_exports(directory if rank == 0 else None, trainer)
    if rank == 0:
        (directory / f"{OPTIMIZER}.json").write_text(json.dumps(encoded))
        written.append(f"{OPTIMIZER}.json")
        if trainer.lr_scheduler is not None:
            written += save_state(directory, LR_SCHEDULER, trainer.lr_scheduler.state_dict())
        written += save_state(directory, TRAINING_STATE, trainer.training_state())
        written += save_state(directory, JOB_STATE, job_state)
    return written


def store_rank_files(
    storage: Storage, step: int, local_dir: Path, files: list[str], rank: int, world_size: int
) -> RankFiles:
    """Make this rank's files of checkpoint ``step`` durable where the manifest will point:
    fsync them in place (a local URI; ``local_dir`` is the step directory) or upload them (S3;
    ``local_dir`` holds only this rank's files). Returns them with sizes and hashes."""
    entries = {
        name: {"size": (local_dir / name).stat().st_size, "sha256": file_sha256(local_dir / name)}
        for name in files
    }
    name = step_dir_name(step)
    if storage.is_local:
        _fsync_files(local_dir, files)
    else:
        storage.upload_dir(local_dir, name)
        _check_uploaded(storage, name, entries)
    return RankFiles(step, rank, world_size, entries)


def commit_checkpoint(
    storage: Storage,
    parts: Sequence[RankFiles],
    *,
    keep_last: int,
    identity: CheckpointIdentity | None = None,
) -> str:
    """Commit a checkpoint whose ranks stored ``parts`` (one :class:`RankFiles` per rank): check
    that every file is in ``storage`` with its size, write the manifest (one atomic write), then
    prune to ``keep_last``. Returns the checkpoint's URI."""
    step, world_size = _check_parts(parts)
    name = step_dir_name(step)
    files = {path: entry for part in parts for path, entry in part.files.items()}
    _check_uploaded(storage, name, files)
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "step": step,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "ranks": world_size,
        "value_head": VALUE_HEAD_FILE in files,
        "lora": f"{ADAPTER_DIR}/adapter_config.json" in files,
        "files": dict(sorted(files.items())),
    }
    if identity is not None:
        manifest["identity"] = identity.to_json()
    raw = json.dumps(manifest, indent=1).encode()
    parse_manifest(raw, join_uri(storage.uri, name))
    if storage.is_local:
        fsync_dir(Path(storage.root) / name)
    storage.write_bytes(f"{name}/{MANIFEST}", raw)
    prune(storage, keep_last, newest_step=step)
    return join_uri(storage.uri, name)


def _check_parts(parts: Sequence[RankFiles]) -> tuple[int, int]:
    """The step and world size of ``parts``, which must be one per rank of one save."""
    if not parts:
        raise CheckpointError("commit needs the RankFiles of every rank; got none")
    step, world_size = parts[0].step, parts[0].world_size
    ranks = sorted(part.rank for part in parts)
    if ranks != list(range(world_size)) or any(
        (part.step, part.world_size) != (step, world_size) for part in parts
    ):
        described = [(part.step, part.rank, part.world_size) for part in parts]
        raise CheckpointError(
            f"commit needs one RankFiles per rank of one save (step, rank, world size): got "
            f"{described}"
        )
    return step, world_size


def file_sha256(path: Path) -> str:
    """The hex sha256 of the file at ``path`` (what a manifest records for it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_files(directory: Path, files: list[str]) -> None:
    for name in files:
        with open(directory / name, "rb") as file:
            os.fsync(file.fileno())
    for parent in {(directory / name).parent for name in files}:
        fsync_dir(parent)


def uncommit(storage: Storage, name: str) -> None:
    """Delete a checkpoint directory, manifest first: a crash half-way leaves debris that no
    reader takes for a checkpoint."""
    storage.delete(f"{name}/{MANIFEST}")
    storage.delete(name)


def _check_uploaded(storage: Storage, name: str, files: dict[str, dict[str, Any]]) -> None:
    stored = storage.list_files(name)
    wrong = [path for path, entry in files.items() if stored.get(path) != entry["size"]]
    if wrong:
        raise CheckpointError(
            f"{join_uri(storage.uri, name)} is incomplete: {sorted(wrong)} missing or of "
            "another size; not committed"
        )


def prune(storage: Storage, keep_last: int, newest_step: int) -> None:
    """Keep the ``keep_last`` newest committed checkpoints; drop uncommitted debris older than
    the one just committed (a save in progress is never older)."""
    committed = committed_steps(storage)
    for step in committed[:-keep_last]:
        uncommit(storage, step_dir_name(step))
    for step in _step_dirs(storage):
        if step < newest_step and step not in committed:
            storage.delete(step_dir_name(step))


def _step_dirs(storage: Storage) -> list[int]:
    return sorted(
        int(match.group(1)) for name in storage.list_dir() if (match := STEP_NAME.match(name))
    )


def committed_steps(storage: Storage) -> list[int]:
    return [s for s in _step_dirs(storage) if storage.exists(f"{step_dir_name(s)}/{MANIFEST}")]


def parse_manifest(raw: bytes, where: str) -> dict[str, Any]:
    """A manifest's content, checked for shape; a ``CheckpointError`` naming ``where`` if it is
    truncated, of another format, or does not list every file a checkpoint needs."""
    try:
        manifest = json.loads(raw)
    except ValueError as error:
        raise CheckpointError(
            f"{where}: {MANIFEST} is not valid JSON (truncated or corrupt): {error}"
        ) from error
    found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
    if found not in (FORMAT, FORMAT_V1):
        raise CheckpointError(f"{where}: {MANIFEST} has format {found!r}, need {FORMAT}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(entry, dict) and {"size", "sha256"} <= set(entry) for entry in files.values()
    ):
        raise CheckpointError(f"{where}: {MANIFEST} has no valid file list")
    missing = [name for name in _required_files(manifest, where) if name not in files]
    if not any(
        name.startswith(f"{POLICY_DIR}/") and name.endswith(".safetensors") for name in files
    ):
        missing.append(f"{POLICY_DIR}/*.safetensors")
    if missing:
        raise CheckpointError(f"{where}: {MANIFEST} does not list {missing}: incomplete checkpoint")
    return manifest


def _required_files(manifest: dict[str, Any], where: str) -> list[str]:
    required = list(REQUIRED_FILES)
    if manifest.get("value_head", True):
        required.append(VALUE_HEAD_FILE)
    if manifest["format"] == FORMAT_V1:
        return required
    ranks = manifest.get("ranks")
    if not isinstance(ranks, int) or ranks < 1:
        raise CheckpointError(f"{where}: {MANIFEST} has no valid number of ranks ({ranks!r})")
    return required + rank_file_names(MODEL, ranks) + rank_file_names(OPTIMIZER, ranks)
