"""This node's copy of the newest checkpoint it saved under a remote (``s3://``) URI.

With ``checkpoint.local_copy_dir`` set, each node keeps its ranks' files of the newest checkpoint
it saved there (:func:`keep_local_copy`, run by the saver once the files are uploaded): a learner
restarted on that node reads every file the copy holds with the manifest's sha256 from there
(``CheckpointFiles`` in checkpoint/load.py), and downloads only the others.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

from rlfleet.common.config import CheckpointConfig

logger = logging.getLogger(__name__)
STAGING_PREFIX = "writer-"
"""A learner process's staging directory beside the local copy: ``.staging/writer-<pid>-``."""


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
