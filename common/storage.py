"""One small filesystem layer over local paths, ``file://`` URIs and ``s3://bucket/prefix``.

The backend is ``pyarrow.fs``: pyarrow is already a runtime dependency (the rollout schema), its S3
client is the AWS C++ SDK (multipart, multi-threaded transfers that release the GIL, so a
background upload does not stall training), and the same API covers local disk, so both kinds of
URI take one code path. s3fs would add aiobotocore/botocore to the runtime dependencies and run
every transfer through an asyncio loop in Python.

Credentials come from the standard AWS chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/
``AWS_SESSION_TOKEN``, ``AWS_PROFILE`` and ``~/.aws``, instance metadata). The endpoint is the
``endpoint_override`` argument (``CheckpointConfig.s3_endpoint_override``), else
``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, else AWS itself.

S3 errors that users can fix are raised as :class:`StorageCredentialsError`,
:class:`BucketNotFoundError` or :class:`StorageUnreachableError` with the URI and the fix in the
message, instead of the SDK's trace.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from urllib.parse import unquote, urlparse

import pyarrow.fs as pafs

CREDENTIAL_ERROR_CODES = frozenset(
    {
        "ACCESS_DENIED",
        "SIGNATURE_DOES_NOT_MATCH",
        "INVALID_ACCESS_KEY_ID",
        "MISSING_AUTHENTICATION_TOKEN",
        "EXPIRED_TOKEN",
        "INVALID_CLIENT_TOKEN_ID",
        "UNRECOGNIZED_CLIENT",
    }
)
_AWS_ERROR = re.compile(r"AWS Error (\w+)")
DOWNLOAD_THREADS = 8
"""Files that :meth:`Storage.download_dir` copies at once (each transfer releases the GIL)."""


class StorageError(OSError):
    """A storage operation failed for a reason the message spells out."""


class StorageCredentialsError(StorageError):
    """The object store rejected the credentials (wrong keys, or no permission)."""


class BucketNotFoundError(StorageError):
    """The bucket of an ``s3://`` URI does not exist."""


class StorageUnreachableError(StorageError):
    """The object store's endpoint could not be reached."""


class UnsafePathError(StorageError):
    """A name read from a store's listing or a manifest would lead outside its directory."""


def resolve_endpoint(endpoint_override: str | None = None) -> str | None:
    """The S3 endpoint to use: the explicit override, else the standard AWS variables."""
    return (
        endpoint_override
        or os.environ.get("AWS_ENDPOINT_URL_S3")
        or os.environ.get("AWS_ENDPOINT_URL")
        or None
    )


def join_uri(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def safe_join(root: str | os.PathLike[str], name: str, where: str) -> Path:
    """``root / name`` for a ``name`` that came from outside (a store's listing, a manifest),
    checked before anything is written or read there. An :class:`UnsafePathError` naming
    ``name`` and ``where`` (what it belongs to: the checkpoint's URI, say) unless ``name`` is a
    plain relative path of ``/``-separated parts (none empty, ``.`` or ``..``; no backslash, NUL
    or drive) and stays inside ``root`` once symlinks are resolved.

    Every place where such a name becomes a local path goes through here: an S3 key may hold
    ``..``, so a listing can name ``step-1/../../x``."""
    reason = _unsafe_name(name)
    path = Path(root) / name
    if reason is None and not path.resolve().is_relative_to(Path(root).resolve()):
        reason = "it resolves through a symlink to outside"
    if reason is not None:
        raise UnsafePathError(f"{where}: refusing the file name {name!r}: {reason} {root}")
    return path


def _unsafe_name(name: str) -> str | None:
    """Why ``name`` is not a plain relative path, or None."""
    if not name:
        return "an empty name is not a file in"
    if "\\" in name or "\0" in name or PureWindowsPath(name).drive:
        return "a backslash, NUL or drive has no place in a name under"
    if name.startswith("/"):
        return "an absolute name is not under"
    if any(part in ("", ".", "..") for part in name.split("/")):
        return "an empty, '.' or '..' part may lead outside"
    return None


@dataclass(frozen=True)
class Storage:
    """A directory-like view of a local directory or an S3 prefix.

    Paths given to the methods are relative to the root (``"step-00000010/MANIFEST.json"``);
    ``""`` is the root itself.
    """

    filesystem: pafs.FileSystem
    root: str
    """The root as a path inside ``filesystem`` (``bucket/prefix`` for S3)."""
    uri: str
    """The root as the user wrote it, for messages."""

    @property
    def is_local(self) -> bool:
        return isinstance(self.filesystem, pafs.LocalFileSystem)

    def child(self, relative: str) -> Storage:
        return Storage(self.filesystem, self._path(relative), join_uri(self.uri, relative))

    def exists(self, relative: str = "") -> bool:
        """Whether ``relative`` is a file, or a directory with at least one file under it."""
        with self._errors():
            kind = self.filesystem.get_file_info(self._path(relative)).type
        if kind == pafs.FileType.Directory:
            return bool(self.list_files(relative))
        return kind == pafs.FileType.File

    def list_dir(self, relative: str = "") -> list[str]:
        """Names of the files and non-empty directories directly under ``relative``.

        Built from the recursive file listing: object stores have no real directories, and
        SeaweedFS keeps listing emptied ones, so a directory counts only while it holds a file.
        """
        return sorted({path.split("/", 1)[0] for path in self.list_files(relative)})

    def list_files(self, relative: str = "") -> dict[str, int]:
        """Every file under ``relative``, recursively: path relative to it -> size in bytes."""
        base = self._path(relative)
        selector = pafs.FileSelector(base, allow_not_found=True, recursive=True)
        with self._errors():
            infos = self.filesystem.get_file_info(selector)
        return {
            info.path[len(base) + 1 :]: info.size
            for info in infos
            if info.type == pafs.FileType.File
        }

    def read_bytes(self, relative: str) -> bytes:
        with self._errors(), self.filesystem.open_input_stream(self._path(relative)) as stream:
            return stream.read()

    def write_bytes(self, relative: str, data: bytes) -> None:
        """Write a whole file so that readers see the old state or the new one, never a part.

        On S3 one object upload is atomic. Locally the data goes to a temporary file that is
        fsynced and renamed over the target (then the directory is fsynced), so a crash or a
        power loss cannot leave a torn file.
        """
        if self.is_local:
            _write_local_atomically(Path(self._path(relative)), data)
            return
        with self._errors(), self.filesystem.open_output_stream(self._path(relative)) as stream:
            stream.write(data)

    def upload_dir(self, local_dir: str | os.PathLike[str], relative: str = "") -> None:
        """Copy every file under ``local_dir`` to ``relative``, keeping the layout."""
        with self._errors():
            pafs.copy_files(
                str(Path(local_dir).resolve()),
                self._path(relative),
                source_filesystem=pafs.LocalFileSystem(),
                destination_filesystem=self.filesystem,
                chunk_size=8 << 20,
            )

    def download_dir(self, relative: str, local_dir: str | os.PathLike[str]) -> Path:
        """Copy every file under ``relative`` into ``local_dir`` (created if needed). Every
        listed name is checked (:func:`safe_join`) before the first file is copied, so a
        hostile listing (``a/../../x``) writes nothing anywhere."""
        listed = self.list_files(relative)
        if not listed:
            raise FileNotFoundError(f"nothing to download at {join_uri(self.uri, relative)}")
        destination = Path(local_dir).resolve()
        where = join_uri(self.uri, relative) if relative else self.uri
        targets = {name: safe_join(destination, name, where) for name in sorted(listed)}
        if self.is_local:  # a symlink in a local store must not read from outside it
            for name in targets:
                safe_join(self._path(relative), name, where)
        destination.mkdir(parents=True, exist_ok=True)
        with ThreadPoolExecutor(max_workers=DOWNLOAD_THREADS) as pool:
            copies = [
                pool.submit(self.download_file, f"{relative.strip('/')}/{name}", target)
                for name, target in targets.items()
            ]
            for copy in copies:
                copy.result()
        return destination

    def download_file(self, relative: str, local_path: str | os.PathLike[str]) -> None:
        """Copy the file ``relative`` to ``local_path`` (its directory created if needed), which
        the caller checked (:func:`safe_join`) when ``relative`` came from a listing."""
        Path(local_path).parent.mkdir(parents=True, exist_ok=True)
        with self._errors():
            pafs.copy_files(
                self._path(relative),
                str(local_path),
                source_filesystem=self.filesystem,
                destination_filesystem=pafs.LocalFileSystem(),
                chunk_size=8 << 20,
            )

    def delete(self, relative: str = "") -> None:
        """Delete a file or everything under a prefix; a missing path is not an error."""
        path = self._path(relative)
        with self._errors():
            kind = self.filesystem.get_file_info(path).type
            if kind == pafs.FileType.File:
                self.filesystem.delete_file(path)
            elif kind == pafs.FileType.Directory:
                self.filesystem.delete_dir(path)

    def _path(self, relative: str) -> str:
        relative = relative.strip("/")
        return f"{self.root}/{relative}" if relative else self.root

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Turn the S3 SDK's errors that users can fix into errors that say what to fix."""
        try:
            yield
        except StorageError:
            raise
        except OSError as error:
            translated = _translate_s3_error(error, self.uri)
            if translated is None:
                raise
            raise translated from None


def open_storage(uri: str | os.PathLike[str], endpoint_override: str | None = None) -> Storage:
    """A :class:`Storage` for a local path, ``file://`` URI or ``s3://bucket/prefix``.

    For S3 the bucket is checked once here, so wrong credentials or a missing bucket fail at
    once with a clear error rather than halfway through a checkpoint.
    """
    uri = str(uri)
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        return _open_s3(uri, parsed.netloc, parsed.path.strip("/"), endpoint_override)
    if parsed.scheme == "file":
        return _open_local(unquote(parsed.path))
    if "://" in uri:
        raise ValueError(f"unsupported storage URI {uri!r}: use a local path, file:// or s3://")
    return _open_local(uri)


def _open_local(path: str) -> Storage:
    root = Path(path).expanduser().resolve()
    return Storage(pafs.LocalFileSystem(), str(root), str(root))


def _open_s3(uri: str, bucket: str, prefix: str, endpoint_override: str | None) -> Storage:
    if not bucket:
        raise ValueError(f"S3 URI {uri!r} has no bucket: use s3://bucket/prefix")
    endpoint = resolve_endpoint(endpoint_override)
    filesystem = pafs.S3FileSystem(
        endpoint_override=endpoint,
        region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        connect_timeout=10,
        request_timeout=60,
    )
    storage = Storage(filesystem, f"{bucket}/{prefix}" if prefix else bucket, uri.rstrip("/"))
    _check_bucket(storage, bucket, endpoint)
    return storage


def _check_bucket(storage: Storage, bucket: str, endpoint: str | None) -> None:
    where = f"at {endpoint}" if endpoint else "on AWS"
    try:
        with storage._errors():
            kind = storage.filesystem.get_file_info(bucket).type
    except StorageError as error:
        raise type(error)(f"{error} (checking bucket {bucket!r} {where})") from None
    if kind == pafs.FileType.NotFound:
        raise BucketNotFoundError(
            f"bucket {bucket!r} of {storage.uri} does not exist {where}; create it first "
            "(rlfleet never creates buckets)"
        )


def _translate_s3_error(error: OSError, uri: str) -> StorageError | None:
    message = str(error)
    match = _AWS_ERROR.search(message)
    code = match.group(1) if match else ""
    if code in CREDENTIAL_ERROR_CODES:
        return StorageCredentialsError(
            f"access to {uri} was denied ({code}): the credentials are wrong or lack permission "
            "on the bucket; check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) "
            f"and the endpoint. Server said: {message}"
        )
    if code == "NO_SUCH_BUCKET":
        return BucketNotFoundError(f"the bucket of {uri} does not exist. Server said: {message}")
    if code == "NETWORK_CONNECTION":
        return StorageUnreachableError(
            f"cannot reach the object store for {uri}: check the endpoint "
            f"(s3_endpoint_override or AWS_ENDPOINT_URL). Server said: {message}"
        )
    return None


def _write_local_atomically(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(temporary, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    fsync_dir(path.parent)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename or a new file in ``path`` durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
