"""Checkpoints of a training run on local disk or in object storage, committed by a manifest.

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
of ranks (checkpoint/shards.py): each rank reads only the slices of the files that
overlap its own shards, so the copy is exact; ``policy/`` and ``value_head.safetensors`` are
exports for people and tools (checkpoint/export.py). Checkpoints of the first format,
``rlfleet-checkpoint/1`` (whole tensors in ``policy/``, the optimizer keyed by position), still
load into a plain trainer.

Only a directory with a manifest counts (:func:`latest_checkpoint`, :func:`list_checkpoints`), so
a save that crashes or is killed half-way leaves the previous checkpoint the latest; the next save
of that step or of a later one removes the debris. Older checkpoints are pruned to ``keep_last``
only after the new manifest is committed. Nothing is pickled: tensors go through safetensors,
everything else through JSON.

Saving from N ranks (the rank group's protocol; :func:`save_checkpoint` runs it over
torch.distributed):

1. every rank calls ``CheckpointSaver(uri, ..., auto_commit=False).save(step, trainer, state)``
   at once: rank 0 clears debris of that step, a barrier, then each rank writes its own files
   (rank 0 also the exports, gathered tensor by tensor from all ranks, and the JSON states);
   training may go on when it returns;
2. each rank's ``stored_files()`` returns once its files are hashed and fsynced (or uploaded):
   a :class:`RankFiles`;
3. rank 0's ``commit(parts)`` with every rank's :class:`RankFiles` checks that the files are in
   the store with their sizes, writes the manifest, and prunes.

A local URI with several ranks needs a filesystem that all of them see. One rank
(``auto_commit=True``, the default) commits by itself: :class:`CheckpointSaver` writes the files
(for an ``s3://`` URI into a local staging directory) in the foreground, since that snapshots the
weights; hashing, the upload, the manifest and pruning run in a background thread, and ``wait``
returns once the checkpoint is committed.

With a remote URI each node keeps its ranks' files of the newest checkpoint it saved in
``checkpoint.local_copy_dir`` (:func:`keep_local_copy`): a learner restarted on that node reads
every file the copy holds with the manifest's sha256 from there, and downloads only the others.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from rlfleet.checkpoint.export import (
    POLICY_DIR,
    VALUE_HEAD_FILE,
    has_value_head,
    policy_of,
    write_exports,
)
from rlfleet.checkpoint.identity import CheckpointIdentity
from rlfleet.checkpoint.identity import model_fingerprint as model_fingerprint
from rlfleet.checkpoint.shards import (
    CheckpointError,
    ShardReader,
    rank_file_names,
    write_rank_file,
)
from rlfleet.checkpoint.state import (
    encode_state,
    load_model_tensors,
    load_optimizer_state,
    load_state,
    model_tensors,
    optimizer_state,
    save_state,
)
from rlfleet.common.config import CheckpointConfig
from rlfleet.common.processes import pid_named, remove_orphans
from rlfleet.common.storage import Storage, fsync_dir, join_uri, open_storage
from rlfleet.trainers.lora import ADAPTER_DIR, has_adapters

FORMAT = "rlfleet-checkpoint/2"
FORMAT_V1 = "rlfleet-checkpoint/1"
MANIFEST = "MANIFEST.json"
MODEL = "model"
OPTIMIZER = "optimizer"
LR_SCHEDULER = "lr_scheduler"
TRAINING_STATE = "training_state"
JOB_STATE = "job_state"
STEP_NAME = re.compile(r"^step-(\d+)$")

logger = logging.getLogger(__name__)
STAGING_PREFIX = "writer-"
"""A learner process's staging directory beside the local copy: ``.staging/writer-<pid>-``."""

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
class CheckpointInfo:
    step: int
    uri: str
    num_bytes: int
    created: str
    problem: str | None = None
    """Why the checkpoint cannot be used (an unreadable manifest), else None."""


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


def _endpoint(config: CheckpointConfig | None) -> str | None:
    return config.s3_endpoint_override if config else None


def local_copy_root(root_uri: str, config: CheckpointConfig | None) -> Path | None:
    """Where this node keeps its copy of the newest checkpoint it saved under the remote
    ``root_uri`` (``checkpoint.local_copy_dir``, a directory per URI); None for a local URI or
    without ``local_copy_dir``."""
    if config is None or config.local_copy_dir is None or not root_uri.startswith("s3://"):
        return None
    digest = hashlib.sha256(root_uri.rstrip("/").encode()).hexdigest()[:16]
    return Path(config.local_copy_dir).expanduser() / digest


def keep_local_copy(root: Path, name: str, staging: Path, files: list[str]) -> None:
    """Moves this rank's stored files of checkpoint ``name`` from ``staging`` to ``root/name``
    (ranks on one node fill the same copy) and drops the copies of other steps, so the node
    keeps its newest checkpoint only. A copy that cannot be kept is a warning: the store has
    the checkpoint."""
    target = root / name
    try:
        for relative in files:
            destination = target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(staging / relative, destination)
        for other in root.glob("step-*"):
            if other.name != name:
                shutil.rmtree(other, ignore_errors=True)
    except OSError as error:
        logger.warning("no local copy of checkpoint %s in %s: %s", name, root, error)


def rank_and_world_size() -> tuple[int, int]:
    """This process's place in the default torch.distributed group (rank 0 of 1 without one)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# ----------------------------------------------------------------------------------------------
# Writing a rank's files and committing a checkpoint


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
        name: {"size": (local_dir / name).stat().st_size, "sha256": _sha256(local_dir / name)}
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


def _matches(path: Path, entry: dict[str, Any]) -> bool:
    """Whether the file at ``path`` has the size and sha256 of its manifest ``entry``."""
    return path.stat().st_size == entry["size"] and _sha256(path) == entry["sha256"]


def _sha256(path: Path) -> str:
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


def save_checkpoint(
    uri: str,
    step: int,
    trainer: Any,
    job_state: dict[str, Any],
    *,
    keep_last: int,
    config: CheckpointConfig | None = None,
    identity: CheckpointIdentity | None = None,
) -> str:
    """Write and commit ``<uri>/step-N/`` in the foreground; returns its URI.

    With several torch.distributed ranks every rank calls it at once: each stores its files,
    rank 0 commits them all, and every rank returns once the checkpoint is committed (or raises
    the reason it was not)."""
    rank, world_size = rank_and_world_size()
    saver = CheckpointSaver(
        uri, keep_last=keep_last, config=config, identity=identity, auto_commit=world_size == 1
    )
    try:
        saved = saver.save(step, trainer, job_state)
        if world_size == 1:
            saver.wait()
        else:
            _commit_on_rank0(saver, rank, world_size)
        return saved
    finally:
        saver.close()


def _commit_on_rank0(saver: CheckpointSaver, rank: int, world_size: int) -> None:
    """Gather every rank's stored files (or why it failed) to rank 0, which commits; every rank
    learns the outcome."""
    try:
        mine: RankFiles | str = saver.stored_files()
    except Exception as error:  # reported to rank 0, which refuses to commit
        mine = f"rank {rank}: {error}"
    parts: list[RankFiles | str | None] = [None] * world_size
    dist.all_gather_object(parts, mine)
    problems = [part for part in parts if isinstance(part, str)]
    outcome = [None if not problems else "; ".join(problems)]
    if rank == 0 and not problems:
        try:
            saver.commit([part for part in parts if isinstance(part, RankFiles)])
        except Exception as error:
            outcome = [f"rank 0 could not commit: {error}"]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        raise CheckpointError(f"checkpoint not committed: {outcome[0]}")


class CheckpointSaver:
    """Saves checkpoints to one URI; only the snapshot blocks the caller.

    ``save`` first waits for the previous save (one in flight at a time, so staging space and
    pruning never race), writes this rank's files locally (into the step directory for a local
    URI, a staging directory for S3) and returns; a background thread then hashes them and
    fsyncs or uploads them, and with ``auto_commit`` (one rank) commits the manifest and prunes.
    ``wait`` blocks until that is done and re-raises its error; call it before the job ends
    (``close`` does). With several ranks (``auto_commit=False``), ``stored_files`` gives this
    rank's part and rank 0's ``commit`` takes every rank's (see the module's docstring).
    ``identity`` is recorded in the manifest, for ``load_checkpoint(..., expect=...)``.
    """

    def __init__(
        self,
        uri: str,
        *,
        keep_last: int,
        config: CheckpointConfig | None = None,
        staging_dir: str | os.PathLike[str] | None = None,
        identity: CheckpointIdentity | None = None,
        auto_commit: bool = True,
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.storage = open_storage(uri, _endpoint(config))
        self.keep_last = keep_last
        self.local_copy = local_copy_root(self.storage.uri, config)
        if staging_dir is None and self.local_copy is not None:
            staging_dir = self._local_staging(self.local_copy)
        self.staging_dir = staging_dir
        self.identity = identity
        self.auto_commit = auto_commit
        self._uploads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-upload")
        self._pending: Future[RankFiles] | None = None
        self._stored: RankFiles | None = None

    def _local_staging(self, local_copy: Path) -> Path | None:
        """This process's staging directory beside the local copy (which is then a rename
        away), once those of processes that are gone (killed mid-upload) are removed; None,
        and no local copy, when it cannot be made there (a read-only home, say)."""
        staging = local_copy / ".staging" / pid_named(STAGING_PREFIX)
        try:
            staging.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            logger.warning("no local copy of the checkpoints in %s: %s", local_copy, error)
            self.local_copy = None
            return None
        remove_orphans(staging.parent, STAGING_PREFIX)
        return staging

    def save(self, step: int, trainer: Any, job_state: dict[str, Any]) -> str:
        """Snapshot the trainer and job state as checkpoint ``step``; returns its URI (committed
        once :meth:`wait`, or rank 0's :meth:`commit`, returns). Every rank calls it at once."""
        self.wait()
        rank, world_size = rank_and_world_size()
        if self.auto_commit and world_size > 1:
            raise CheckpointError(
                f"rank {rank} of {world_size}: a checkpoint of several ranks is committed by rank "
                "0's commit(parts); build the CheckpointSaver with auto_commit=False"
            )
        name = step_dir_name(step)
        if rank == 0:
            uncommit(self.storage, name)
        if world_size > 1:
            dist.barrier()
        if self.storage.is_local:
            local_dir, staging = Path(self.storage.root) / name, None
        else:
            if self.staging_dir is not None:
                Path(self.staging_dir).mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.staging_dir))
            local_dir = staging
        try:
            files = write_checkpoint_files(local_dir, trainer, job_state, rank, world_size)
        except BaseException:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
            raise
        self._stored = None
        self._pending = self._uploads.submit(
            self._store, step, local_dir, files, rank, world_size, staging
        )
        return join_uri(self.storage.uri, name)

    def wait(self) -> str | None:
        """Block until the last save's files are stored (and, with ``auto_commit``, committed);
        its URI, or None if nothing was saved."""
        pending, self._pending = self._pending, None
        if pending is not None:
            self._stored = pending.result()
        return (
            join_uri(self.storage.uri, step_dir_name(self._stored.step)) if self._stored else None
        )

    def stored_files(self) -> RankFiles:
        """This rank's files of the last save, once stored (what rank 0's :meth:`commit`
        needs from every rank)."""
        self.wait()
        if self._stored is None:
            raise CheckpointError("stored_files(): nothing was saved")
        return self._stored

    def commit(self, parts: Sequence[RankFiles]) -> str:
        """Rank 0: commit the save that every rank's ``parts`` describe; returns its URI."""
        return commit_checkpoint(
            self.storage, parts, keep_last=self.keep_last, identity=self.identity
        )

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._uploads.shutdown(wait=True)

    def __enter__(self) -> CheckpointSaver:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _store(
        self,
        step: int,
        local_dir: Path,
        files: list[str],
        rank: int,
        world_size: int,
        staging: Path | None,
    ) -> RankFiles:
        try:
            part = store_rank_files(self.storage, step, local_dir, files, rank, world_size)
            if self.auto_commit:
                self.commit([part])
            if staging is not None and self.local_copy is not None:
                keep_local_copy(self.local_copy, step_dir_name(step), staging, files)
        finally:
            if staging is not None:
                shutil.rmtree(staging, ignore_errors=True)
        return part


# ----------------------------------------------------------------------------------------------
# Finding, pulling and loading checkpoints


def _step_dirs(storage: Storage) -> list[int]:
    return sorted(
        int(match.group(1)) for name in storage.list_dir() if (match := STEP_NAME.match(name))
    )


def committed_steps(storage: Storage) -> list[int]:
    return [s for s in _step_dirs(storage) if storage.exists(f"{step_dir_name(s)}/{MANIFEST}")]


def list_checkpoints(uri: str, *, config: CheckpointConfig | None = None) -> list[CheckpointInfo]:
    """The committed checkpoints under ``uri``, oldest first; one whose manifest cannot be read
    is listed with its ``problem`` instead of hiding the good ones beside it."""
    storage = open_storage(uri, _endpoint(config))
    infos = []
    for step in committed_steps(storage):
        name = step_dir_name(step)
        step_uri = join_uri(storage.uri, name)
        try:
            manifest = parse_manifest(storage.read_bytes(f"{name}/{MANIFEST}"), step_uri)
        except CheckpointError as error:
            infos.append(CheckpointInfo(step, step_uri, 0, "", problem=str(error)))
            continue
        size = sum(entry["size"] for entry in manifest["files"].values())
        infos.append(CheckpointInfo(step, step_uri, size, manifest["created"]))
    return infos


def latest_checkpoint(uri: str, *, config: CheckpointConfig | None = None) -> str | None:
    """The URI of the newest committed checkpoint under ``uri`` with a readable manifest, or
    None. (Its files are verified when it is loaded.)"""
    usable = [info for info in list_checkpoints(uri, config=config) if info.problem is None]
    return usable[-1].uri if usable else None


def resolve_checkpoint(uri: str, *, config: CheckpointConfig | None = None) -> Storage:
    """The committed checkpoint that ``uri`` names: a ``.../step-N`` directory, or the latest
    one under a checkpoint root."""
    base, _, last = str(uri).rstrip("/").rpartition("/")
    match = STEP_NAME.match(last)
    if match:
        step_uri = join_uri(base, step_dir_name(int(match.group(1))))
        storage = open_storage(step_uri, _endpoint(config))
        if not storage.exists(MANIFEST):
            raise CheckpointError(
                f"{step_uri} is not a committed checkpoint (no {MANIFEST}): missing, or a save "
                "that was interrupted"
            )
        return storage
    latest = latest_checkpoint(uri, config=config)
    if latest is None:
        raise CheckpointError(f"no committed checkpoint under {uri}")
    return open_storage(latest, _endpoint(config))


def resolve_resume(
    uri: str, *, expect: CheckpointIdentity, config: CheckpointConfig | None = None
) -> str:
    """The committed checkpoint that ``uri`` names (the latest under a root), once checked to
    belong to ``expect``'s job and model; pass it to every rank's :func:`load_checkpoint`, so
    that all load the same one."""
    storage = resolve_checkpoint(uri, config=config)
    manifest = parse_manifest(storage.read_bytes(MANIFEST), storage.uri)
    expect.check(manifest.get("identity"), storage.uri)
    return storage.uri


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


def verify_checkpoint(directory: Path) -> dict[str, Any]:
    """Check the directory against its manifest: every listed file present with its size and
    sha256, and no file that the manifest does not list. Returns the manifest."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{directory} has no {MANIFEST}: not a committed checkpoint")
    manifest = parse_manifest(manifest_path.read_bytes(), str(directory))
    files = CheckpointFiles(open_storage(directory), manifest)
    for relative in manifest["files"]:
        files.path(relative)
    return manifest


class CheckpointFiles:
    """The files of one committed checkpoint, checked against its manifest: up front that it
    lists every file there is, with its size; each file's sha256 when it is first used. A remote
    checkpoint's files are downloaded one by one as they are used (a rank downloads only what
    it reads), except those that ``local_copy`` (this node's copy of the checkpoint, see
    ``keep_local_copy``) holds with the manifest's sha256."""

    def __init__(
        self, storage: Storage, manifest: dict[str, Any], local_copy: Path | None = None
    ) -> None:
        self.storage = storage
        self.manifest = manifest
        self.local_copy = local_copy
        self._verified: set[str] = set()
        self._scratch = None if storage.is_local else tempfile.TemporaryDirectory()
        self.directory = Path(self._scratch.name if self._scratch else storage.root)
        self._check_listing()

    def _check_listing(self) -> None:
        present = self.storage.list_files()
        present.pop(MANIFEST, None)
        listed = self.manifest["files"]
        for relative, entry in listed.items():
            if relative not in present:
                raise CheckpointError(
                    f"{self.storage.uri}: {relative} is listed in the manifest but missing"
                )
            if present[relative] != entry["size"]:
                raise CheckpointError(
                    f"{self.storage.uri}: {relative} does not match the manifest (corrupt)"
                )
        extra = sorted(set(present) - set(listed))
        if extra:
            raise CheckpointError(
                f"{self.storage.uri}: {extra} are not in the manifest (added after the save); "
                "refusing to load files nobody vouched for"
            )

    def has(self, relative: str) -> bool:
        return relative in self.manifest["files"]

    def path(self, relative: str) -> Path:
        """The local path of checkpoint file ``relative``, verified against the manifest."""
        entry = self.manifest["files"].get(relative)
        if entry is None:
            raise CheckpointError(f"{self.storage.uri}: the manifest does not list {relative}")
        path = self.directory / relative
        if relative not in self._verified:
            if self._scratch is not None and not self._copied_locally(relative, path):
                self._download(relative, path)
            if not _matches(path, entry):
                raise CheckpointError(
                    f"{self.storage.uri}: {relative} does not match the manifest (corrupt)"
                )
            self._verified.add(relative)
        return path

    def _copied_locally(self, relative: str, path: Path) -> bool:
        """Copies ``relative`` from this node's copy of the checkpoint to ``path`` when the
        copy holds it with the manifest's size and sha256; False (a download is needed) if
        not."""
        if self.local_copy is None or not (self.local_copy / relative).is_file():
            return False
        if not _matches(self.local_copy / relative, self.manifest["files"][relative]):
            logger.warning(
                "%s in the local copy %s does not match the manifest of %s; downloading it",
                relative,
                self.local_copy,
                self.storage.uri,
            )
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.local_copy / relative, path)
        return True

    def _download(self, relative: str, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(
            self.storage.child(relative).root,
            str(path),
            source_filesystem=self.storage.filesystem,
            destination_filesystem=pafs.LocalFileSystem(),
        )

    def load_state(self, name: str) -> Any:
        """A state that :func:`save_state` wrote as ``<name>.json`` (+ ``.safetensors``)."""
        self.path(f"{name}.json")
        if self.has(f"{name}.safetensors"):
            self.path(f"{name}.safetensors")
        return load_state(self.directory, name)

    def close(self) -> None:
        if self._scratch is not None:
            self._scratch.cleanup()

    def __enter__(self) -> CheckpointFiles:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def pull_checkpoint(
    uri: str, dest_dir: str | os.PathLike[str], *, config: CheckpointConfig | None = None
) -> Path:
    """Download a checkpoint (``.../step-N``, or the latest under a root) into ``dest_dir`` and
    verify it; ``dest_dir/policy`` then loads with ``AutoModelForCausalLM.from_pretrained``."""
    storage = resolve_checkpoint(uri, config=config)
    destination = Path(dest_dir)
    if destination.exists() and any(destination.iterdir()):
        raise FileExistsError(f"{destination} is not empty; pull into a new directory")
    storage.download_dir("", destination)
    verify_checkpoint(destination)
    return destination.resolve()


def load_checkpoint(
    uri: str,
    trainer: Any,
    *,
    config: CheckpointConfig | None = None,
    expect: CheckpointIdentity | None = None,
) -> dict[str, Any]:
    """Restore ``trainer`` (model, value head if it has one, optimizer, scheduler, training
    state) from the checkpoint ``uri`` names, after verifying what it reads; returns the saved
    job state. The trainer may be sharded over any number of ranks (each rank calls this with
    the same step URI, see :func:`resolve_resume`) or plain. With ``expect``, a checkpoint of
    another job or model is refused before anything is read."""
    storage = resolve_checkpoint(uri, config=config)
    manifest = parse_manifest(storage.read_bytes(MANIFEST), storage.uri)
    if expect is not None:
        expect.check(manifest.get("identity"), storage.uri)
    base, _, name = storage.uri.rpartition("/")
    copy_root = local_copy_root(base, config)
    with CheckpointFiles(storage, manifest, copy_root / name if copy_root else None) as files:
        _check_value_head(manifest.get("value_head", True), trainer, storage.uri)
        _check_lora(manifest.get("lora", False), trainer, storage.uri)
        if manifest["format"] == FORMAT_V1:
            _load_v1_tensors(files, trainer)
        else:
            _load_tensors(files, trainer, manifest["ranks"])
        _load_scheduler(trainer, files)
        trainer.load_training_state(files.load_state(TRAINING_STATE))
        return files.load_state(JOB_STATE)


def _check_value_head(saved: bool, trainer: Any, where: str) -> None:
    if saved != has_value_head(trainer):
        saved_text, current = ("has a", "has none") if saved else ("has no", "has one")
        raise CheckpointError(
            f"{where}: the checkpoint {saved_text} value head but the trainer's model {current}"
        )


def _check_lora(saved: bool, trainer: Any, where: str) -> None:
    """A LoRA checkpoint resumes only a LoRA job, a full fine-tune only a full fine-tune."""
    if saved != has_adapters(trainer.model):
        kinds = ("LoRA adapters", "the whole model")
        held, trained = kinds if saved else kinds[::-1]
        raise CheckpointError(
            f"{where}: the checkpoint holds {held} but this job trains {trained}; point "
            "checkpoint.uri elsewhere or set lora as the checkpoint's job did"
        )


def _load_tensors(files: CheckpointFiles, trainer: Any, world_size: int) -> None:
    with ShardReader(files.path, MODEL, world_size) as reader:
        load_model_tensors(trainer.model, reader)
    encoded = json.loads(files.path(f"{OPTIMIZER}.json").read_text())
    with ShardReader(files.path, OPTIMIZER, world_size) as reader:
        load_optimizer_state(trainer.model, trainer.optimizer, encoded, reader)


def _load_v1_tensors(files: CheckpointFiles, trainer: Any) -> None:
    """Format 1: whole tensors in ``policy/`` and ``value_head.safetensors``, the optimizer
    keyed by position (a plain trainer only)."""
    policy = [files.path(name) for name in files.manifest["files"] if _is_policy_weights(name)]
    load_policy_weights(policy_of(trainer), policy)
    if has_value_head(trainer):
        trainer.model.v_head.load_state_dict(load_file(str(files.path(VALUE_HEAD_FILE))))
    trainer.optimizer.load_state_dict(files.load_state(OPTIMIZER))


def _is_policy_weights(name: str) -> bool:
    return name.startswith(f"{POLICY_DIR}/") and name.endswith(".safetensors")


def load_policy_weights(model: torch.nn.Module, weight_files: list[Path]) -> None:
    """Copy the weights of a saved HF directory's safetensors files into ``model`` in place.

    Weights that ``save_pretrained`` leaves out because they are tied to a saved one (GPT-2's
    ``lm_head``) may be missing; any other missing or unexpected name is an error.
    """
    state_dict: dict[str, torch.Tensor] = {}
    for weight_file in weight_files:
        state_dict.update(load_file(str(weight_file)))
    current = model.state_dict()
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    loaded = {current[key].data_ptr() for key in state_dict if key in current}
    untied = [key for key in missing if current[key].data_ptr() not in loaded]
    if untied or unexpected:
        raise CheckpointError(
            f"the saved policy does not fit the trainer's: missing {untied}, unexpected "
            f"{unexpected}"
        )


def _load_scheduler(trainer: Any, files: CheckpointFiles) -> None:
    saved = files.has(f"{LR_SCHEDULER}.json")
    if saved != (trainer.lr_scheduler is not None):
        raise CheckpointError(
            f"{files.storage.uri}: the checkpoint {'has' if saved else 'has no'} lr_scheduler "
            f"state but the trainer {'has no' if saved else 'has a'} scheduler"
        )
    if saved:
        trainer.lr_scheduler.load_state_dict(files.load_state(LR_SCHEDULER))


# ----------------------------------------------------------------------------------------------
# rlfleet checkpoints list|pull


def add_arguments(parser: argparse.ArgumentParser) -> None:
    endpoint = argparse.ArgumentParser(add_help=False)
    endpoint.add_argument(
        "--endpoint",
        help="S3 endpoint of an S3-compatible store (default: AWS_ENDPOINT_URL, else AWS)",
    )
    actions = parser.add_subparsers(dest="action", required=True)
    listing = actions.add_parser(
        "list", parents=[endpoint], help="list the committed checkpoints under URI"
    )
    listing.add_argument("uri", metavar="URI")
    pull = actions.add_parser("pull", parents=[endpoint], help="download and verify a checkpoint")
    pull.add_argument("uri", metavar="URI[/step-N]", help="a checkpoint, or a root (its latest)")
    pull.add_argument("dest", metavar="DIR")


def run(args: argparse.Namespace) -> int:
    config = CheckpointConfig(uri=args.uri, s3_endpoint_override=args.endpoint)
    try:
        if args.action == "list":
            infos = list_checkpoints(args.uri, config=config)
            for info in infos:
                if info.problem:
                    print(f"{info.step}\tUNUSABLE\t{info.problem}")
                else:
                    print(f"{info.step}\t{info.num_bytes}\t{info.created}\t{info.uri}")
            if not infos:
                print(f"no committed checkpoints under {args.uri}", file=sys.stderr)
        else:
            print(pull_checkpoint(args.uri, args.dest, config=config))
    except (OSError, CheckpointError) as error:
        print(f"rlfleet checkpoints {args.action}: {error}", file=sys.stderr)
        return 1
    return 0
