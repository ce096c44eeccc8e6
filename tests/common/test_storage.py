"""common.storage on local disk and against a real SeaweedFS S3 server on loopback."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from support.hostile_store import HostileStore

from rlfleet.common.storage import (
    BucketNotFoundError,
    StorageCredentialsError,
    StorageUnreachableError,
    UnsafePathError,
    open_storage,
    safe_join,
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


# ----------------------------------------------------------------------------------------------
# Names from a listing or a manifest never lead outside the directory they are joined to


def files_under(root: Path) -> dict[str, bytes]:
    return {
        path.relative_to(root).as_posix(): path.read_bytes()
        for path in root.rglob("*")
        if path.is_file()
    }


def test_safe_join_takes_plain_relative_names(tmp_path: Path) -> None:
    for name in ("MANIFEST.json", "policy/model.safetensors", "a/b/c..d/.hidden", "x y"):
        assert safe_join(tmp_path, name, "s3://b/run/step-1") == tmp_path / name
    (tmp_path / "inside").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "inside")
    assert safe_join(tmp_path, "link/f", "here") == tmp_path / "link" / "f"


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "step-00000006/../../../../x",
        "policy/..",
        "..",
        "./x",
        "a/./b",
        "/etc/passwd",
        "",
        "a//b",
        "a/",
        "..\\..\\x",
        "policy\\model.safetensors",
        "C:x",
        "a\0b",
    ],
)
def test_safe_join_refuses_names_that_may_lead_outside(tmp_path: Path, name: str) -> None:
    with pytest.raises(UnsafePathError) as refused:
        safe_join(tmp_path / "dest", name, "s3://b/run/step-00000006")
    message = str(refused.value)
    assert "\n" not in message
    assert message.startswith(f"s3://b/run/step-00000006: refusing the file name {name!r}")


def test_safe_join_refuses_a_symlink_that_resolves_outside(tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    (tmp_path / "root").mkdir()
    (tmp_path / "root" / "policy").symlink_to(tmp_path / "outside")
    (tmp_path / "root" / "file").symlink_to(tmp_path / "outside" / "secret")
    for name in ("policy/model.safetensors", "file"):
        with pytest.raises(UnsafePathError, match="resolves through a symlink to outside"):
            safe_join(tmp_path / "root", name, "the checkpoint")


def test_download_refuses_a_listing_that_leads_outside_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hostile = HostileStore.serving_s3(monkeypatch)
    hostile.put("s3://bucket/run/step-1/a.txt", b"fine")
    hostile.put("s3://bucket/run/step-1/../../../../x", b"escaped")
    destination = tmp_path / "1" / "2" / "3" / "4" / "dest"
    with pytest.raises(UnsafePathError, match=r"s3://bucket/run/step-1: .*'\.\./\.\./\.\./\.\./x'"):
        open_storage("s3://bucket/run").download_dir("step-1", destination)
    assert files_under(tmp_path) == {}


def test_download_refuses_a_local_store_symlink_to_outside_before_reading(
    tmp_path: Path,
) -> None:
    (tmp_path / "secret").write_bytes(b"not the store's")
    store = tmp_path / "store"
    (store / "step-1").mkdir(parents=True)
    (store / "step-1" / "a.txt").write_bytes(b"fine")
    (store / "step-1" / "b.txt").symlink_to(tmp_path / "secret")
    with pytest.raises(UnsafePathError, match="'b.txt': it resolves through a symlink"):
        open_storage(store).download_dir("step-1", tmp_path / "dest")
    assert not (tmp_path / "dest").exists()


def test_download_copies_every_listed_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    hostile = HostileStore.serving_s3(monkeypatch)
    for name, data in {"a.txt": b"a", "sub/b.bin": b"b" * 1000, "sub/deeper/c": b""}.items():
        hostile.put(f"s3://bucket/run/step-1/{name}", data)
    pulled = open_storage("s3://bucket/run").download_dir("step-1", tmp_path / "pulled")
    assert files_under(pulled) == {"a.txt": b"a", "sub/b.bin": b"b" * 1000, "sub/deeper/c": b""}
