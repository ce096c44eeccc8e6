"""common.storage on local disk and against a real SeaweedFS S3 server on loopback."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from rlfleet.common.storage import (
    BucketNotFoundError,
    StorageCredentialsError,
    StorageUnreachableError,
    open_storage,
)

pytest_plugins = ["support.s3_server"]

if TYPE_CHECKING:
    from support.s3_server import S3Server


def make_tree(root: Path) -> Path:
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_bytes(b"alpha")
    (root / "sub" / "b.bin").write_bytes(bytes(range(256)) * 1000)
    (root / "sub" / "deeper" / "c").write_bytes(b"")
    return root


TREE = {"a.txt": 5, "sub/b.bin": 256_000, "sub/deeper/c": 0}


def check_round_trip(uri: str, tmp_path: Path) -> None:
    storage = open_storage(uri)
    storage.upload_dir(make_tree(tmp_path / "src"), "run/step-1")
    storage.write_bytes("run/step-1/MANIFEST.json", b'{"ok": true}')

    assert storage.list_dir() == ["run"]
    assert storage.list_dir("run") == ["step-1"]
    assert storage.list_files("run/step-1") == {**TREE, "MANIFEST.json": 12}
    assert storage.exists("run/step-1/a.txt") and storage.exists("run/step-1")
    assert not storage.exists("run/step-2")
    assert storage.read_bytes("run/step-1/sub/b.bin") == bytes(range(256)) * 1000

    pulled = storage.child("run").download_dir("step-1", tmp_path / "pulled")
    assert (pulled / "sub" / "b.bin").read_bytes() == bytes(range(256)) * 1000
    assert (pulled / "MANIFEST.json").read_bytes() == b'{"ok": true}'

    storage.delete("run/step-1/a.txt")
    assert not storage.exists("run/step-1/a.txt")
    storage.delete("run/step-1")
    storage.delete("run/never-existed")
    assert storage.list_files("run") == {}
    assert storage.list_dir("run") == [] and storage.list_dir("run/step-1") == []
    assert not storage.exists("run/step-1")


def test_local_round_trip(tmp_path: Path) -> None:
    check_round_trip(str(tmp_path / "store"), tmp_path)


def test_file_uri_names_the_same_directory(tmp_path: Path) -> None:
    open_storage(tmp_path / "store").write_bytes("x/y", b"1")
    assert open_storage(f"file://{tmp_path}/store").read_bytes("x/y") == b"1"


def test_local_write_replaces_whole_file_and_leaves_no_temporaries(tmp_path: Path) -> None:
    storage = open_storage(tmp_path)
    storage.write_bytes("d/MANIFEST.json", b"old")
    storage.write_bytes("d/MANIFEST.json", b"new contents")
    assert (tmp_path / "d" / "MANIFEST.json").read_bytes() == b"new contents"
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["MANIFEST.json"]


def test_unknown_scheme_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="gs://b/p.*local path, file:// or s3://"):
        open_storage("gs://b/p")


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        open_storage(tmp_path).read_bytes("nope")


def test_s3_round_trip(s3_env: S3Server, tmp_path: Path) -> None:
    check_round_trip(f"s3://{s3_env.bucket}/storage-test", tmp_path)


def test_s3_endpoint_override_beats_environment(
    s3_env: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    storage = open_storage(f"s3://{s3_env.bucket}/override", endpoint_override=s3_env.endpoint)
    storage.write_bytes("f", b"via override")
    assert storage.read_bytes("f") == b"via override"


def test_s3_wrong_secret_key_says_credentials(
    s3_env: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(StorageCredentialsError, match="AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"):
        open_storage(f"s3://{s3_env.bucket}/x")


def test_s3_unknown_access_key_says_credentials(
    s3_env: S3Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    with pytest.raises(
        StorageCredentialsError, match=f"access to s3://{s3_env.bucket}/x was denied"
    ):
        open_storage(f"s3://{s3_env.bucket}/x")


def test_s3_missing_bucket_says_bucket(s3_env: S3Server) -> None:
    with pytest.raises(BucketNotFoundError, match="bucket 'no-such-bucket' .* does not exist"):
        open_storage("s3://no-such-bucket/prefix")


def test_s3_unreachable_endpoint_says_endpoint(s3_env: S3Server, unused_endpoint: str) -> None:
    with pytest.raises(StorageUnreachableError, match="check the endpoint"):
        open_storage(f"s3://{s3_env.bucket}/x", endpoint_override=unused_endpoint)
