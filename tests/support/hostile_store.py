"""An ``s3://`` store that serves what a hostile bucket may hold: keys with ``..`` parts.

AWS S3 stores a key such as ``run/step-00000006/../../../../x`` as it is, and lists it under
``run/step-00000006/``. The SeaweedFS server of the tests (support/s3_server.py) refuses to
store one (botocore's PutObject of such a key answers InvalidRequest, pyarrow's upload
MethodNotAllowed), so it cannot play that bucket. :meth:`HostileStore.serving_s3` makes every
``s3://`` URI open an in-memory fsspec store instead, through the same ``Storage`` class and
pyarrow API as a real bucket: it keeps every key as given, so what its listing names reaches the
code that turns names into local paths.
"""

from __future__ import annotations

import hashlib
import json

import pyarrow.fs as pafs
import pytest
from fsspec.implementations.memory import MemoryFileSystem

from rlfleet.common import storage


class HostileStore:
    """An in-memory object store: ``s3://bucket/prefix`` is the key prefix ``/bucket/prefix``."""

    def __init__(self) -> None:
        self.memory = MemoryFileSystem(skip_instance_cache=True)
        self.memory.store = {}  # its own keys, not the class-wide dict every instance shares
        self.memory.pseudo_dirs = [""]
        self.filesystem = pafs.PyFileSystem(pafs.FSSpecHandler(self.memory))

    @classmethod
    def serving_s3(cls, monkeypatch: pytest.MonkeyPatch) -> HostileStore:
        """A new store that ``open_storage`` opens for every ``s3://`` URI while the test runs."""
        store = cls()
        monkeypatch.setattr(storage, "_open_s3", store.open)
        return store

    def open(self, uri: str, bucket: str, prefix: str, endpoint: str | None) -> storage.Storage:
        root = "/" + "/".join(part for part in (bucket, prefix) if part)
        return storage.Storage(self.filesystem, root, uri.rstrip("/"))

    def put(self, uri: str, data: bytes) -> None:
        """Store ``data`` under the key of ``uri`` exactly as written (``..`` parts kept)."""
        self.memory.pipe_file(self.key(uri), data)

    def get(self, uri: str) -> bytes:
        return self.memory.cat_file(self.key(uri))

    def keys(self) -> list[str]:
        return sorted(self.memory.store)

    def add_to_checkpoint(self, step_uri: str, name: str, data: bytes) -> None:
        """Put ``data`` at ``step_uri/name`` and list it in that checkpoint's manifest, with its
        size and sha256, as a hostile writer of the bucket would."""
        self.put(f"{step_uri}/{name}", data)
        manifest = json.loads(self.get(f"{step_uri}/MANIFEST.json"))
        digest = hashlib.sha256(data).hexdigest()
        manifest["files"][name] = {"size": len(data), "sha256": digest}
        self.put(f"{step_uri}/MANIFEST.json", json.dumps(manifest).encode())

    @staticmethod
    def key(uri: str) -> str:
        return "/" + uri.removeprefix("s3://")
