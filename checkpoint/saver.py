"""Saving checkpoints so that only the snapshot blocks training: :class:`CheckpointSaver`, and
:func:`save_checkpoint`, the foreground save of one rank or of every rank of a group.

One rank (``auto_commit=True``, the default) commits by itself: :class:`CheckpointSaver` writes
the files (for an ``s3://`` URI into a local staging directory) in the foreground, since that
snapshots the weights; hashing, the upload, the manifest and pruning run in a background thread,
and ``wait`` returns once the checkpoint is committed. With several ranks each stores its part and
rank 0 commits them all (the protocol in checkpoint/commit.py). A local URI with several ranks
needs a filesystem that all of them see.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch.distributed as dist

from rlfleet.checkpoint.commit import (
    RankFiles,
    commit_checkpoint,
    endpoint_of,
    rank_and_world_size,
    step_dir_name,
    store_rank_files,
    uncommit,
    write_checkpoint_files,
)
from rlfleet.checkpoint.identity import CheckpointIdentity
from rlfleet.checkpoint.local_copy import STAGING_PREFIX, keep_local_copy, local_copy_root
from rlfleet.checkpoint.shards import CheckpointError
from rlfleet.common.config import CheckpointConfig
from rlfleet.common.processes import pid_named, remove_orphans
from rlfleet.common.storage import join_uri, open_storage

logger = logging.getLogger(__name__)


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
        self.storage = open_storage(uri, endpoint_of(config))
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
