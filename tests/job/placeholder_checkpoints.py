"""Committed checkpoints whose files hold nothing to load: a manifest with an identity and a
step, for what reads only those (finding where a job resumes, which save is committed)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from rlfleet.checkpoint.commit import (
    REQUIRED_FILES,
    CheckpointIdentity,
    RankFiles,
    commit_checkpoint,
    step_dir_name,
)
from rlfleet.checkpoint.export import POLICY_DIR, VALUE_HEAD_FILE
from rlfleet.checkpoint.shards import rank_file_names
from rlfleet.common.storage import open_storage

PLACEHOLDER_FILES = [
    *REQUIRED_FILES,
    VALUE_HEAD_FILE,
    f"{POLICY_DIR}/model.safetensors",
    *rank_file_names("model", 1),
    *rank_file_names("optimizer", 1),
]


def commit_placeholder(uri: Path, step: int, identity: CheckpointIdentity) -> str:
    """A committed checkpoint ``step`` of ``identity`` whose files hold nothing to load."""
    directory = uri / step_dir_name(step)
    files = {}
    for name in PLACEHOLDER_FILES:
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"{}")
        files[name] = {"size": 2, "sha256": hashlib.sha256(b"{}").hexdigest()}
    parts = [RankFiles(step, 0, 1, files)]
    return commit_checkpoint(open_storage(str(uri)), parts, keep_last=5, identity=identity)
