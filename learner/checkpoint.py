"""Checkpoints of a training run on local disk or in object storage, committed by a manifest.

A checkpoint is the directory ``<uri>/step-<8 digits>/``::

    policy/                      the policy as a Hugging Face directory (safetensors, config,
                                 tokenizer): ``AutoModelForCausalLM.from_pretrained`` loads it
    value_head.safetensors       the value head's weights (PPO only: the model of a critic-free
                                 trainer is a plain causal LM)
    optimizer.safetensors/.json  the optimizer state: tensors, and the rest as JSON
    lr_scheduler.json            the scheduler state (only when the trainer has one)
    training_state.json          the trainer's ``training_state()`` (KL controller, RNG, ...)
    job_state.json               what the job loop passed (dataset cursor, policy version, ...)
    MANIFEST.json                written last: every file's size and sha256

Only a directory with a manifest counts (:func:`latest_checkpoint`, :func:`list_checkpoints`), so
a save that crashes or is killed half-way leaves the previous checkpoint the latest; the next save
of that step or of a later one removes the debris. Older checkpoints are pruned to ``keep_last``
only after the new manifest is committed. Nothing is pickled: tensors go through safetensors,
everything else through JSON.

:class:`CheckpointSaver` writes the files (for an ``s3://`` URI into a local staging directory):
the only part that must stop training, since it snapshots the weights. Hashing, the upload, the
manifest and pruning then run in a background thread; :func:`save_checkpoint` waits for them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rlfleet.common.config import CheckpointConfig
from rlfleet.common.storage import Storage, fsync_dir, join_uri, open_storage

FORMAT = "rlfleet-checkpoint/1"
MANIFEST = "MANIFEST.json"
POLICY_DIR = "policy"
VALUE_HEAD_FILE = "value_head.safetensors"
OPTIMIZER = "optimizer"
LR_SCHEDULER = "lr_scheduler"
TRAINING_STATE = "training_state"
JOB_STATE = "job_state"
STEP_NAME = re.compile(r"^step-(\d+)$")
_TAGS = ("__tensor__", "__ndarray__", "__tuple__", "__items__")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, uncommitted, corrupt, or does not fit the trainer."""


REQUIRED_FILES = (
    f"{POLICY_DIR}/config.json",
    f"{OPTIMIZER}.json",
    f"{TRAINING_STATE}.json",
    f"{JOB_STATE}.json",
)
"""Files every checkpoint's manifest must list (besides the policy's ``*.safetensors``, and
``VALUE_HEAD_FILE`` unless the manifest says ``"value_head": false``)."""


@dataclass(frozen=True)
class CheckpointInfo:
    step: int
    uri: str
    num_bytes: int
    created: str
    problem: str | None = None
    """Why the checkpoint cannot be used (an unreadable manifest), else None."""


def step_dir_name(step: int) -> str:
    if step < 0:
        raise ValueError(f"checkpoint step must be >= 0, got {step}")
    return f"step-{step:08d}"


def _endpoint(config: CheckpointConfig | None) -> str | None:
    return config.s3_endpoint_override if config else None


# ----------------------------------------------------------------------------------------------
# State dicts without pickle: tensors to safetensors, the rest to JSON


def encode_state(state: Any) -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested state (dicts, lists, tuples, tensors, numbers) into JSON and tensors.

    Tuples, dicts with non-string keys (an optimizer's ``state`` is keyed by parameter index) and
    numpy arrays are tagged so that :func:`decode_state` gives back the same structure.
    """
    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().cpu().contiguous()
            return {"__tensor__": path}
        if isinstance(value, np.ndarray):
            tensors[path] = torch.from_numpy(np.ascontiguousarray(value))
            return {"__ndarray__": path}
        if isinstance(value, np.generic):
            return value.item()
        if isinstance(value, dict):
            if all(isinstance(key, str) and key not in _TAGS for key in value):
                return {key: encode(item, f"{path}.{key}") for key, item in value.items()}
            return {
                "__items__": [
                    [encode(key, f"{path}.key{i}"), encode(item, f"{path}.{key}")]
                    for i, (key, item) in enumerate(value.items())
                ]
            }
        if isinstance(value, tuple):
            return {"__tuple__": [encode(item, f"{path}.{i}") for i, item in enumerate(value)]}
        if isinstance(value, list):
            return [encode(item, f"{path}.{i}") for i, item in enumerate(value)]
        if value is None or isinstance(value, bool | int | float | str):
            return value
        raise TypeError(
            f"{path}: cannot store a {type(value).__name__} in a checkpoint (tensors, arrays, "
            "numbers, strings, lists, tuples and dicts only)"
        )

    return encode(state, "state"), tensors


def decode_state(encoded: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of :func:`encode_state`."""
    if isinstance(encoded, list):
        return [decode_state(item, tensors) for item in encoded]
    if not isinstance(encoded, dict):
        return encoded
    if set(encoded) == {"__tensor__"}:
        return tensors[encoded["__tensor__"]]
    if set(encoded) == {"__ndarray__"}:
        return tensors[encoded["__ndarray__"]].numpy()
    if set(encoded) == {"__tuple__"}:
        return tuple(decode_state(item, tensors) for item in encoded["__tuple__"])
    if set(encoded) == {"__items__"}:
        return {
            decode_state(key, tensors): decode_state(item, tensors)
            for key, item in encoded["__items__"]
        }
    return {key: decode_state(item, tensors) for key, item in encoded.items()}


def save_state(directory: Path, name: str, state: Any) -> None:
    """``<name>.json`` and, when the state holds tensors, ``<name>.safetensors``."""
    encoded, tensors = encode_state(state)
    if tensors:
        save_file(tensors, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(encoded))


def load_state(directory: Path, name: str) -> Any:
    tensor_file = directory / f"{name}.safetensors"
    tensors = load_file(str(tensor_file)) if tensor_file.exists() else {}
    return decode_state(json.loads((directory / f"{name}.json").read_text()), tensors)


# ----------------------------------------------------------------------------------------------
# Writing a checkpoint directory and committing it


def write_checkpoint_files(directory: Path, trainer: Any, job_state: dict[str, Any]) -> None:
    """Everything but the manifest, into ``directory``: a complete snapshot of the trainer, so
    training may go on as soon as this returns."""
    directory.mkdir(parents=True, exist_ok=True)
    policy_dir = directory / POLICY_DIR
    policy_of(trainer).save_pretrained(policy_dir)
    trainer.tokenizer.save_pretrained(policy_dir)
    if has_value_head(trainer):
        state = trainer.model.v_head.state_dict()
        value_head = {k: v.detach().contiguous() for k, v in state.items()}
        save_file(value_head, str(directory / VALUE_HEAD_FILE))
    save_state(directory, OPTIMIZER, trainer.optimizer.state_dict())
    if trainer.lr_scheduler is not None:
        save_state(directory, LR_SCHEDULER, trainer.lr_scheduler.state_dict())
    save_state(directory, TRAINING_STATE, trainer.training_state())
    save_state(directory, JOB_STATE, job_state)


def has_value_head(trainer: Any) -> bool:
    """Whether the trainer's model carries a value head (PPO) or is a plain causal LM (a
    critic-free trainer's)."""
    return hasattr(trainer.model, "v_head")


def policy_of(trainer: Any) -> torch.nn.Module:
    """The trainer's causal LM, without any value head."""
    return trainer.model.pretrained_model if has_value_head(trainer) else trainer.model


def build_manifest(directory: Path, step: int) -> dict[str, Any]:
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        relative = path.relative_to(directory).as_posix()
        if relative != MANIFEST:
            files[relative] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return {
        "format": FORMAT,
        "step": step,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "value_head": VALUE_HEAD_FILE in files,
        "files": files,
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_tree(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as file:
                os.fsync(file.fileno())
        else:
            fsync_dir(path)
    fsync_dir(directory)


def uncommit(storage: Storage, name: str) -> None:
    """Delete a checkpoint directory, manifest first: a crash half-way leaves debris that no
    reader takes for a checkpoint."""
    storage.delete(f"{name}/{MANIFEST}")
    storage.delete(name)


def publish(storage: Storage, step: int, local_dir: Path, keep_last: int) -> str:
    """Commit the checkpoint files in ``local_dir`` as ``step`` under ``storage``, then prune.

    For a local ``storage`` the files are already in place (``local_dir`` is the step
    directory); for S3 they are uploaded first. The manifest is written last, in one atomic write.
    """
    name = step_dir_name(step)
    manifest = build_manifest(local_dir, step)
    if storage.is_local:
        _fsync_tree(local_dir)
    else:
        uncommit(storage, name)
        storage.upload_dir(local_dir, name)
        _check_uploaded(storage, name, manifest)
    storage.write_bytes(f"{name}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
    prune(storage, keep_last, newest_step=step)
    return join_uri(storage.uri, name)


def _check_uploaded(storage: Storage, name: str, manifest: dict[str, Any]) -> None:
    uploaded = storage.list_files(name)
    wrong = [
        path for path, entry in manifest["files"].items() if uploaded.get(path) != entry["size"]
    ]
    if wrong:
        raise CheckpointError(
            f"upload of {storage.uri}/{name} is incomplete: {wrong}; not committed"
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
) -> str:
    """Write and commit ``<uri>/step-N/`` in the foreground; returns its URI."""
    saver = CheckpointSaver(uri, keep_last=keep_last, config=config)
    try:
        saver.save(step, trainer, job_state)
        return saver.wait()
    finally:
        saver.close()


class CheckpointSaver:
    """Saves checkpoints to one URI; only the snapshot blocks the caller.

    ``save`` first waits for the previous save (one in flight at a time, so staging space and
    pruning never race), writes the checkpoint's files locally (into the step directory for a
    local URI, a staging directory for S3) and returns; a background thread then hashes them,
    uploads them (S3), commits the manifest and prunes. ``wait`` blocks until the last save is
    committed and re-raises its error; call it before the job ends (``close`` does).
    """

    def __init__(
        self,
        uri: str,
        *,
        keep_last: int,
        config: CheckpointConfig | None = None,
        staging_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.storage = open_storage(uri, _endpoint(config))
        self.keep_last = keep_last
        self.staging_dir = staging_dir
        self._uploads = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoint-upload")
        self._pending: Future[str] | None = None

    def save(self, step: int, trainer: Any, job_state: dict[str, Any]) -> str:
        """Snapshot the trainer and job state as checkpoint ``step``; returns its URI (committed
        once :meth:`wait` returns)."""
        self.wait()
        name = step_dir_name(step)
        if self.storage.is_local:
            uncommit(self.storage, name)
            local_dir = Path(self.storage.root) / name
            write_checkpoint_files(local_dir, trainer, job_state)
            self._pending = self._uploads.submit(
                publish, self.storage, step, local_dir, self.keep_last
            )
        else:
            if self.staging_dir is not None:
                Path(self.staging_dir).mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.staging_dir))
            try:
                write_checkpoint_files(staging, trainer, job_state)
            except BaseException:
                shutil.rmtree(staging, ignore_errors=True)
                raise
            self._pending = self._uploads.submit(self._upload, step, staging)
        return join_uri(self.storage.uri, name)

    def wait(self) -> str | None:
        """Block until the last save is committed; its URI, or None if nothing was saved."""
        pending, self._pending = self._pending, None
        return pending.result() if pending else None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._uploads.shutdown(wait=True)

    def __enter__(self) -> CheckpointSaver:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _upload(self, step: int, staging: Path) -> str:
        try:
            return publish(self.storage, step, staging, self.keep_last)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


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


def parse_manifest(raw: bytes, where: str) -> dict[str, Any]:
    """A manifest's content, checked for shape; a ``CheckpointError`` naming ``where`` if it is
    truncated, of another format, or does not list every file a checkpoint needs."""
    try:
        manifest = json.loads(raw)
    except ValueError as error:
        raise CheckpointError(
            f"{where}: {MANIFEST} is not valid JSON (truncated or corrupt): {error}"
        ) from error
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CheckpointError(f"{where}: {MANIFEST} has format {found!r}, need {FORMAT}")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
        isinstance(entry, dict) and {"size", "sha256"} <= set(entry) for entry in files.values()
    ):
        raise CheckpointError(f"{where}: {MANIFEST} has no valid file list")
    required = REQUIRED_FILES + ((VALUE_HEAD_FILE,) if manifest.get("value_head", True) else ())
    missing = [name for name in required if name not in files]
    if not any(
        name.startswith(f"{POLICY_DIR}/") and name.endswith(".safetensors") for name in files
    ):
        missing.append(f"{POLICY_DIR}/*.safetensors")
    if missing:
        raise CheckpointError(f"{where}: {MANIFEST} does not list {missing}: incomplete checkpoint")
    return manifest


def verify_checkpoint(directory: Path) -> dict[str, Any]:
    """Check the directory against its manifest: every listed file present with its size and
    sha256, and no file that the manifest does not list. Returns the manifest."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{directory} has no {MANIFEST}: not a committed checkpoint")
    manifest = parse_manifest(manifest_path.read_bytes(), str(directory))
    for relative, entry in manifest["files"].items():
        path = directory / relative
        if not path.is_file():
            raise CheckpointError(f"{directory}: {relative} is listed in the manifest but missing")
        if path.stat().st_size != entry["size"] or _sha256(path) != entry["sha256"]:
            raise CheckpointError(f"{directory}: {relative} does not match the manifest (corrupt)")
    present = {
        path.relative_to(directory).as_posix() for path in directory.rglob("*") if path.is_file()
    }
    extra = sorted(present - set(manifest["files"]) - {MANIFEST})
    if extra:
        raise CheckpointError(
            f"{directory}: {extra} are not in the manifest (added after the save); refusing to "
            "load files nobody vouched for"
        )
    return manifest


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


@contextmanager
def local_checkpoint(uri: str, config: CheckpointConfig | None = None) -> Iterator[Path]:
    """The checkpoint ``uri`` names as a verified local directory (downloaded if remote)."""
    storage = resolve_checkpoint(uri, config=config)
    if storage.is_local:
        directory = Path(storage.root)
        verify_checkpoint(directory)
        yield directory
        return
    with tempfile.TemporaryDirectory(prefix="rlfleet-checkpoint-") as scratch:
        yield pull_checkpoint(storage.uri, Path(scratch) / "checkpoint", config=config)


def load_checkpoint(
    uri: str, trainer: Any, *, config: CheckpointConfig | None = None
) -> dict[str, Any]:
    """Restore ``trainer`` (policy, value head if it has one, optimizer, scheduler, training
    state) from the checkpoint ``uri`` names, after verifying it; returns the saved job state."""
    with local_checkpoint(uri, config) as directory:
        saved_value_head = (directory / VALUE_HEAD_FILE).is_file()
        if saved_value_head != has_value_head(trainer):
            saved, current = ("has a", "has none") if saved_value_head else ("has no", "has one")
            raise CheckpointError(
                f"{directory}: the checkpoint {saved} value head but the trainer's model {current}"
            )
        load_policy_weights(policy_of(trainer), directory / POLICY_DIR)
        if saved_value_head:
            trainer.model.v_head.load_state_dict(load_file(str(directory / VALUE_HEAD_FILE)))
        trainer.optimizer.load_state_dict(load_state(directory, OPTIMIZER))
        _load_scheduler(trainer, directory)
        trainer.load_training_state(load_state(directory, TRAINING_STATE))
        return load_state(directory, JOB_STATE)


def load_policy_weights(model: torch.nn.Module, policy_dir: Path) -> None:
    """Copy the safetensors weights of a saved HF directory into ``model`` in place.

    Weights that ``save_pretrained`` leaves out because they are tied to a saved one (GPT-2's
    ``lm_head``) may be missing; any other missing or unexpected name is an error.
    """
    state_dict: dict[str, torch.Tensor] = {}
    for shard in sorted(policy_dir.glob("*.safetensors")):
        state_dict.update(load_file(str(shard)))
    current = model.state_dict()
    missing, unexpected = model.load_state_dict(state_dict, strict=False)
    loaded = {current[key].data_ptr() for key in state_dict if key in current}
    untied = [key for key in missing if current[key].data_ptr() not in loaded]
    if untied or unexpected:
        raise CheckpointError(
            f"{policy_dir} does not fit the policy: missing {untied}, unexpected {unexpected}"
        )


def _load_scheduler(trainer: Any, directory: Path) -> None:
    saved = (directory / f"{LR_SCHEDULER}.json").exists()
    if saved != (trainer.lr_scheduler is not None):
        raise CheckpointError(
            f"{directory}: the checkpoint {'has' if saved else 'has no'} lr_scheduler state but "
            f"the trainer {'has no' if saved else 'has a'} scheduler"
        )
    if saved:
        trainer.lr_scheduler.load_state_dict(load_state(directory, LR_SCHEDULER))


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
