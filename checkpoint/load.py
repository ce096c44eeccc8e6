"""Finding committed checkpoints and loading one into a trainer.

:func:`list_checkpoints` and :func:`latest_checkpoint` find the committed checkpoints under a
root (only a directory with a manifest counts); :func:`resolve_checkpoint` and
:func:`resolve_resume` pick the one a URI names. :func:`load_checkpoint` restores a trainer,
plain or sharded over any number of ranks, from format 2's per-rank files
(checkpoint/shards.py), or a plain trainer from format 1 (``rlfleet-checkpoint/1``: whole
tensors in ``policy/``, the optimizer keyed by position). :class:`CheckpointFiles` verifies every
file it hands out against the manifest and refuses, before anything is read or written, a
manifest or a listing whose file names would lead outside the checkpoint (``safe_join``).
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from rlfleet.checkpoint.commit import (
    FORMAT_V1,
    JOB_STATE,
    LR_SCHEDULER,
    MANIFEST,
    MODEL,
    OPTIMIZER,
    STEP_NAME,
    TRAINING_STATE,
    committed_steps,
    endpoint_of,
    file_sha256,
    parse_manifest,
    step_dir_name,
)
from rlfleet.checkpoint.export import POLICY_DIR, VALUE_HEAD_FILE, has_value_head, policy_of
from rlfleet.checkpoint.identity import CheckpointIdentity
from rlfleet.checkpoint.local_copy import local_copy_root
from rlfleet.checkpoint.shards import CheckpointError, ShardReader
from rlfleet.checkpoint.state import load_model_tensors, load_optimizer_state, load_state
from rlfleet.common.config import CheckpointConfig
from rlfleet.common.storage import Storage, UnsafePathError, join_uri, open_storage, safe_join
from rlfleet.trainers.lora import has_adapters

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    uri: str
    num_bytes: int
    created: str
    problem: str | None = None
    """Why the checkpoint cannot be used (an unreadable manifest), else None."""


def list_checkpoints(uri: str, *, config: CheckpointConfig | None = None) -> list[CheckpointInfo]:
    """The committed checkpoints under ``uri``, oldest first; one whose manifest cannot be read
    is listed with its ``problem`` instead of hiding the good ones beside it."""
    storage = open_storage(uri, endpoint_of(config))
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
        storage = open_storage(step_uri, endpoint_of(config))
        if not storage.exists(MANIFEST):
            raise CheckpointError(
                f"{step_uri} is not a committed checkpoint (no {MANIFEST}): missing, or a save "
                "that was interrupted"
            )
        return storage
    latest = latest_checkpoint(uri, config=config)
    if latest is None:
        raise CheckpointError(f"no committed checkpoint under {uri}")
    return open_storage(latest, endpoint_of(config))


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


def check_listing(storage: Storage, manifest: dict[str, Any], directory: Path) -> None:
    """Check, before any file is read, that the checkpoint in ``storage`` holds exactly the
    files its ``manifest`` lists, with their sizes, and that each name (of the listing or the
    manifest) stays inside ``directory``, where the files are or will be downloaded."""
    present = storage.list_files()
    present.pop(MANIFEST, None)
    listed = manifest["files"]
    for relative in sorted({*present, *listed}):
        checkpoint_path(directory, relative, storage.uri)
    for relative, entry in listed.items():
        if relative not in present:
            raise CheckpointError(
                f"{storage.uri}: {relative} is listed in the manifest but missing"
            )
        if present[relative] != entry["size"]:
            raise CheckpointError(
                f"{storage.uri}: {relative} does not match the manifest (corrupt)"
            )
    extra = sorted(set(present) - set(listed))
    if extra:
        raise CheckpointError(
            f"{storage.uri}: {extra} are not in the manifest (added after the save); "
            "refusing to load files nobody vouched for"
        )


def checkpoint_path(directory: Path, relative: str, checkpoint: str) -> Path:
    """``directory / relative`` for the file ``relative`` of ``checkpoint``, a name read from
    its manifest or its store's listing: a one-line ``CheckpointError`` naming both when the
    name would lead outside ``directory`` (``safe_join``)."""
    try:
        return safe_join(directory, relative, checkpoint)
    except UnsafePathError as error:
        raise CheckpointError(str(error)) from None


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
        try:
            check_listing(storage, manifest, self.directory)
        except BaseException:
            self.close()
            raise

    def has(self, relative: str) -> bool:
        return relative in self.manifest["files"]

    def path(self, relative: str) -> Path:
        """The local path of checkpoint file ``relative``, verified against the manifest."""
        entry = self.manifest["files"].get(relative)
        if entry is None:
            raise CheckpointError(f"{self.storage.uri}: the manifest does not list {relative}")
        path = checkpoint_path(self.directory, relative, self.storage.uri)
        if relative not in self._verified:
            if self._scratch is not None and not self._copied_locally(relative, path):
                self.storage.download_file(relative, path)
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
        if self.local_copy is None:
            return False
        copy = checkpoint_path(self.local_copy, relative, self.storage.uri)
        if not copy.is_file():
            return False
        if not _matches(copy, self.manifest["files"][relative]):
            logger.warning(
                "%s in the local copy %s does not match the manifest of %s; downloading it",
                relative,
                self.local_copy,
                self.storage.uri,
            )
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(copy, path)
        return True

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


def _matches(path: Path, entry: dict[str, Any]) -> bool:
    """Whether the file at ``path`` has the size and sha256 of its manifest ``entry``."""
    return path.stat().st_size == entry["size"] and file_sha256(path) == entry["sha256"]


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
