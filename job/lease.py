"""One run at a time per ``output_dir`` and per ``checkpoint.uri``: a lease in each.

Two runs writing the same ``output_dir`` (or the same checkpoint prefix) interleave their
stats.jsonl lines and checkpoints and both say "done". So ``rlfleet train`` takes a lease on
both before it reads the checkpoint it resumes from, and a second run is refused with one line
naming the key, the owner and what to do (exit 2). A lease is the file ``.rlfleet-lease.json``
there: who holds it (``rlfleet train``, host, pid, start time) and a heartbeat that a
background thread refreshes every ``HEARTBEAT_S`` seconds. It is released (the file removed)
when the run ends, however it ends short of SIGKILL.

A lease is stale, and the next run takes it over (and resumes), when

- its owner ran on this machine (the same host, boot and pid namespace) and that process is
  gone (a SIGKILL, a crash): at once;
- its owner ran elsewhere (another host, container or boot) and its heartbeat is older than
  ``STALE_AFTER_S``. A run that finds a fresher one watches it: a heartbeat that moves means a
  live owner (refused); one that stops moving goes stale, and is taken over, within
  ``STALE_AFTER_S`` (hosts' clocks are assumed to agree to well within that).

Every change of a lease is a compare-and-swap (:class:`LeaseStore`), so of several runs that
start at once, or take over the same stale lease, exactly one wins:

- local paths (``output_dir``, a local or ``file://`` ``checkpoint.uri``): a new lease is a
  complete file ``os.link``-ed into place, which fails when one is there (atomic on local
  filesystems and NFS); a heartbeat, takeover or release compares and renames (or removes)
  under an exclusive ``flock`` of the lease file, held for that moment only. The content is
  only ever replaced whole, so no reader sees a part of one;
- ``s3://``: conditional requests (botocore, a dependency for this): a new lease is a PUT
  with ``If-None-Match: *``, a heartbeat or takeover a PUT with ``If-Match`` of the ETag read,
  a release a DELETE with ``If-Match`` (SeaweedFS, the tests' server, honours all three, and
  of 16 PUTs racing on one key lets one through; AWS S3 honours the conditional PUTs; a store
  that answers a conditional DELETE with NotImplemented gets read, compared and deleted).

A run whose heartbeat finds the lease changed under it (taken over after it stalled for longer
than ``STALE_AFTER_S``) logs that once and leaves the other's lease alone at release.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from rlfleet.common.config import JobConfig
from rlfleet.common.errors import one_line

logger = logging.getLogger(__name__)

LEASE_NAME = ".rlfleet-lease.json"
"""The lease file in ``output_dir`` and at the root of ``checkpoint.uri``."""
HEARTBEAT_S = 5.0
"""How often the owner rewrites its heartbeat."""
STALE_AFTER_S = 30.0
"""A lease held on another host whose heartbeat is older than this is stale."""
OWNER = "rlfleet train"


class LeaseError(Exception):
    """A lease this run cannot take; the message is the one line for the user, starting with
    the config key."""


class LeaseHeld(LeaseError):  # noqa: N818 - the name says what the caller meets
    """Another live run holds the lease."""


class LeaseStore(Protocol):
    """Where one lease lives; every change is a compare-and-swap of its whole content."""

    def read(self) -> bytes | None:
        """The lease's content; None when there is none."""

    def swap(self, expected: bytes | None, new: bytes | None) -> bool:
        """Atomically: when the content is ``expected`` (None: no lease), make it ``new``
        (None: remove the lease) and return True; else change nothing and return False."""


# -- the owner -------------------------------------------------------------------------------


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def pid_space() -> str:
    """What makes a pid mean the same process: the host, its boot and the pid namespace."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return f"{socket.gethostname()}/{_read_text('/proc/sys/kernel/random/boot_id')}/{namespace}"


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks after boot, Linux); None when unknown or gone."""
    stat = _read_text(f"/proc/{pid}/stat")
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else None


def process_alive(pid: int, started: str | None) -> bool:
    """Whether ``pid`` is a live (not zombie) process that started at ``started`` (when known)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    stat = _read_text(f"/proc/{pid}/stat")
    if stat and stat.rpartition(")")[2].split()[:1] == ["Z"]:
        return False
    return started is None or process_start(pid) in (None, started)


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, as its file says."""

    token: str
    owner: str
    host: str
    pid: int
    pid_space: str
    process_start: str | None
    started: float
    heartbeat: float

    @classmethod
    def me(cls, now: float) -> Holder:
        pid = os.getpid()
        return cls(
            token=uuid.uuid4().hex,
            owner=OWNER,
            host=socket.gethostname(),
            pid=pid,
            pid_space=pid_space(),
            process_start=process_start(pid),
            started=now,
            heartbeat=now,
        )

    @classmethod
    def parse(cls, content: bytes) -> Holder | None:
        """The holder a lease file names; None when it is not one (a write cut short)."""
        try:
            fields = json.loads(content)
            return cls(**{name: fields[name] for name in cls.__dataclass_fields__})
        except (ValueError, TypeError, KeyError):
            return None

    def encode(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    def beat(self, now: float) -> Holder:
        return replace(self, heartbeat=now)

    @property
    def here(self) -> bool:
        """Whether its pid is one of this machine's (same host, boot and pid namespace)."""
        return self.pid_space == pid_space()

    def alive_here(self) -> bool:
        return self.here and process_alive(self.pid, self.process_start)

    def stale(self, now: float, stale_after_s: float) -> bool:
        """Gone: its process is (here), or its heartbeat is older than ``stale_after_s``."""
        if self.here:
            return not process_alive(self.pid, self.process_start)
        return now - self.heartbeat > stale_after_s

    def describe(self, now: float) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.started))
        beat = "" if self.here else f", heartbeat {max(0.0, now - self.heartbeat):.0f} s ago"
        return f"{self.owner} (pid {self.pid} on host {self.host}, since {since}{beat})"


# -- stores ----------------------------------------------------------------------------------


class LocalLeaseStore:
    """A lease file on a local (or shared) filesystem. Its content is only ever replaced whole
    (a new file linked or renamed into place), so a reader never sees a part of one; a new lease
    is ``os.link``-ed into place (fails when one is there), a change or removal is made under an
    exclusive ``flock`` of the file after comparing its content."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> bytes | None:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def swap(self, expected: bytes | None, new: bytes | None) -> bool:
        if expected is None:
            return new is None or self._link(new)
        fd = self._open_locked()
        if fd is None:
            return False
        try:
            current = os.pread(fd, os.fstat(fd).st_size, 0)
            if current != expected:
                return False
            if new is None:
                os.unlink(self.path)
            else:
                temporary = self._written(new)
                os.replace(temporary, self.path)
            return True
        finally:
            os.close(fd)  # unlocks

    def _link(self, content: bytes) -> bool:
        temporary = self._written(content)
        try:
            os.link(temporary, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(temporary)

    def _written(self, content: bytes) -> Path:
        """A new file beside the lease with ``content``, on disk."""
        temporary = self.path.with_name(f"{self.path.name}.{uuid.uuid4().hex}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, content)
            os.fsync(fd)
        finally:
            os.close(fd)
        return temporary

    def _open_locked(self) -> int | None:
        """A descriptor of the lease file, exclusively locked; None when there is none. A file
        replaced or removed while we waited for its lock is opened again."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDONLY)
            except FileNotFoundError:
                return None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                if os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            except BaseException:
                os.close(fd)
                raise
            os.close(fd)


class S3LeaseStore:
    """A lease object on S3, changed with conditional requests (botocore)."""

    def __init__(self, client: Any, bucket: str, key: str) -> None:
        self.client = client
        self.bucket = bucket
        self.key = key
        self._seen: tuple[bytes | None, str | None] = (None, None)
        """The content last read or written, and its ETag."""

    def read(self) -> bytes | None:
        try:
            answer = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except self.client.exceptions.NoSuchKey:
            self._seen = (None, None)
            return None
        content = answer["Body"].read()
        self._seen = (content, answer["ETag"])
        return content

    def swap(self, expected: bytes | None, new: bytes | None) -> bool:
        from botocore.exceptions import ClientError

        if expected is None:
            condition = {"IfNoneMatch": "*"}
        else:
            if self._seen[0] != expected and self.read() != expected:
                return False
            condition = {"IfMatch": self._seen[1]}
        try:
            if new is None:
                return self._delete(condition, expected)
            answer = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=new, **condition)
        except ClientError as error:
            if _refused(error):
                return False
            raise
        self._seen = (new, answer["ETag"])
        return True

    def _delete(self, condition: dict[str, str], expected: bytes | None) -> bool:
        from botocore.exceptions import ClientError

        if expected is None:
            return self.read() is None
        try:
            self.client.delete_object(Bucket=self.bucket, Key=self.key, **condition)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") != "NotImplemented":
                raise
            if self.read() != expected:  # no conditional delete here: read, compare, delete
                return False
            self.client.delete_object(Bucket=self.bucket, Key=self.key)
        self._seen = (None, None)
        return True


def _refused(error: Any) -> bool:
    """Whether an S3 error is a condition that did not hold (someone else changed the lease)."""
    code = error.response.get("Error", {}).get("Code")
    status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412)


def s3_lease_store(uri: str, endpoint_override: str | None) -> LeaseStore:
    """The lease store under an ``s3://`` URI, changed with conditional requests."""
    from rlfleet.common.storage import open_storage, resolve_endpoint

    storage = open_storage(uri, endpoint_override)  # checks the bucket: a clear error if wrong
    import botocore.config
    import botocore.session

    bucket, _, prefix = storage.root.partition("/")
    client = botocore.session.get_session().create_client(
        "s3",
        endpoint_url=resolve_endpoint(endpoint_override),
        region_name=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        config=botocore.config.Config(
            connect_timeout=10, read_timeout=60, retries={"mode": "standard"}
        ),
    )
    return S3LeaseStore(client, bucket, f"{prefix}/{LEASE_NAME}" if prefix else LEASE_NAME)


# -- the lease -------------------------------------------------------------------------------


class Lease:
    """The lease of one location (config key ``key``, shown as ``where``): ``acquire`` takes it
    (or raises ``LeaseHeld``) and starts the heartbeat; ``release`` stops it and removes the
    lease (a directory made for it goes too when nothing else came into it)."""

    def __init__(
        self,
        key: str,
        where: str,
        store: LeaseStore,
        heartbeat_s: float = HEARTBEAT_S,
        stale_after_s: float = STALE_AFTER_S,
        made_dirs: list[Path] | None = None,
    ) -> None:
        self.key = key
        self.where = where
        self.store = store
        self.heartbeat_s = heartbeat_s
        self.stale_after_s = stale_after_s
        self.made_dirs = made_dirs or []
        """Directories made for the lease, innermost first."""
        self.held: bytes | None = None
        """The lease's content as this run last wrote it (None: not held)."""
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> Holder | None:
        """Takes the lease; returns the stale holder it took over, if any. ``LeaseHeld`` when a
        live run holds it (watched up to ``stale_after_s`` when that run is on another machine
        and its heartbeat is fresh: one that beats is live, one that stops goes stale)."""
        mine = Holder.me(time.time())
        watched: tuple[bytes, float] | None = None
        """The other machine's lease we wait on, and when we first read it (monotonic)."""
        while True:
            current = self.store.read()
            holder = Holder.parse(current) if current is not None else None
            now = time.time()
            if current is None or holder is None or holder.stale(now, self.stale_after_s):
                if self._take(current, mine.beat(now)):
                    return holder
                continue
            if holder.here or (watched and watched[0] != current):
                raise LeaseHeld(self.held_line(holder, now))
            if watched is None:
                watched = (current, time.monotonic())
                wait = self.stale_after_s - (now - holder.heartbeat)
                print(
                    f"{self.key}: {self.where} is held by {holder.describe(now)}; waiting up "
                    f"to {wait + self.heartbeat_s:.0f} s for its heartbeat (a live run is "
                    "refused, a gone one taken over)",
                    flush=True,
                )
            elif time.monotonic() - watched[1] > self.stale_after_s:  # no beat: gone
                if self._take(current, mine.beat(now)):
                    return holder
                continue
            time.sleep(min(self.heartbeat_s, self.stale_after_s))

    def held_line(self, holder: Holder, now: float) -> str:
        return (
            f"{self.key}: {self.where} is in use by {holder.describe(now)}; stop it or choose "
            f"another {self.key}"
        )

    def _take(self, current: bytes | None, mine: Holder) -> bool:
        content = mine.encode()
        if not self.store.swap(current, content):
            return False
        self.held = content
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._beat, name=f"rlfleet-lease-{self.key}", daemon=True
        )
        self._thread.start()
        return True

    def _beat(self) -> None:
        failing = False
        while not self._stop.wait(self.heartbeat_s):
            held = self.held
            if held is None:
                return
            beat = Holder.parse(held).beat(time.time()).encode()  # type: ignore[union-attr]
            try:
                swapped = self.store.swap(held, beat)
            except Exception as error:  # noqa: BLE001 - a failed beat is retried at the next
                if not failing:
                    logger.warning(
                        "%s: cannot refresh the lease on %s (%s); retrying every %g s",
                        self.key,
                        self.where,
                        one_line(error),
                        self.heartbeat_s,
                    )
                failing = True
                continue
            failing = False
            if swapped:
                self.held = beat
                continue
            self.lost = True
            self.held = None
            content = self.store.read()
            other = Holder.parse(content) if content else None
            logger.error(
                "%s: this run lost its lease on %s to %s (its heartbeat stalled for more than "
                "%g s); two runs now write there: stop one of them",
                self.key,
                self.where,
                other.describe(time.time()) if other else "another run",
                self.stale_after_s,
            )
            return

    def release(self) -> None:
        """Stops the heartbeat and removes the lease, if this run still holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        held, self.held = self.held, None
        if held is not None:
            try:
                self.store.swap(held, None)
            except Exception as error:  # noqa: BLE001 - a lease left behind goes stale
                logger.warning(
                    "%s: cannot remove the lease on %s (%s); the next run takes it over",
                    self.key,
                    self.where,
                    one_line(error),
                )
        for directory in self.made_dirs:
            try:
                directory.rmdir()  # only when empty
            except OSError:
                break


def local_lease(key: str, path: str | os.PathLike[str], **timing: float) -> Lease:
    """The lease of a local directory (made when missing, and removed at release, with the
    parents made for it, when nothing else came into it)."""
    directory = Path(path).expanduser().resolve()
    made = [parent for parent in (directory, *directory.parents) if not parent.exists()]
    directory.mkdir(parents=True, exist_ok=True)
    return Lease(key, str(path), LocalLeaseStore(directory / LEASE_NAME), made_dirs=made, **timing)


class JobLeases:
    """The leases of a job: ``output_dir`` and ``checkpoint.uri`` (one lease when they are the
    same local directory). A context manager: leaving it releases what ``acquire`` took."""

    def __init__(self, **timing: float) -> None:
        self.timing = timing
        self.leases: list[Lease] = []
        self.local_dirs: set[Path] = set()
        """The local directories whose lease this job holds."""

    def acquire(self, config: JobConfig) -> None:
        """Takes the job's leases, ``output_dir`` first; ``LeaseHeld`` (nothing kept) when a
        live run holds one, ``LeaseError`` when one cannot be written. A stale lease taken
        over is said on stdout."""
        try:
            self.local_dirs.add(Path(config.output_dir).expanduser().resolve())
            self._take(local_lease("output_dir", config.output_dir, **self.timing))
            uri = config.checkpoint.uri
            if uri is not None:
                lease = self.checkpoint_lease(uri, config.checkpoint.s3_endpoint_override)
                if lease is not None:
                    self._take(lease)
        except BaseException:
            self.release()
            raise

    def checkpoint_lease(self, uri: str, endpoint_override: str | None) -> Lease | None:
        from rlfleet.common.storage import open_storage

        if uri.startswith("s3://"):
            store = s3_lease_store(uri, endpoint_override)
            return Lease("checkpoint.uri", uri, store, **self.timing)
        root = Path(open_storage(uri).root)
        if root in self.local_dirs:
            return None
        self.local_dirs.add(root)
        lease = local_lease("checkpoint.uri", root, **self.timing)
        lease.where = uri
        return lease

    def _take(self, lease: Lease) -> None:
        self.leases.append(lease)
        try:
            previous = lease.acquire()
        except LeaseError:
            raise
        except Exception as error:  # noqa: BLE001 - the store's errors (OSError, botocore's)
            raise LeaseError(
                f"{lease.key}: cannot take the lease on {lease.where} ({one_line(error)}); make "
                f"it writable or choose another {lease.key}"
            ) from error
        if previous is not None:
            now = time.time()
            print(
                f"{lease.key}: took over the lease on {lease.where} from "
                f"{previous.describe(now)}, which is gone",
                flush=True,
            )

    def release(self) -> None:
        for lease in reversed(self.leases):
            lease.release()
        self.leases = []
        self.local_dirs = set()

    def __enter__(self) -> JobLeases:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
