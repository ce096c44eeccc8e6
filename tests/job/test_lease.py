"""The lease that keeps a second run off a live run's ``output_dir`` and checkpoint prefix
(job/lease.py): taken atomically, refused with one line while its owner lives, taken over once
the owner is gone (its process here, its heartbeat elsewhere), released at the end. Local
files here; S3 (the real SeaweedFS server, conditional requests) in
the slow tests at the end."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from support.job_configs import small_job

from rlfleet.job.lease import (
    LEASE_NAME,
    Holder,
    JobLeases,
    Lease,
    LeaseHeld,
    LocalLeaseStore,
    local_lease,
    s3_lease_store,
)

if TYPE_CHECKING:
    from support.s3_server import S3Server

FAST = {"heartbeat_s": 0.05, "stale_after_s": 1.0}
"""Lease timing for tests: beats every 50 ms, stale after 1 s."""
HELD = (
    r"^output_dir: {where} is in use by rlfleet train \(pid {pid} on host \S+, since "
    r"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d \w+{beat}\); stop it or choose another output_dir$"
)


def holder_in(path: Path) -> Holder:
    holder = Holder.parse((path / LEASE_NAME).read_bytes())
    assert holder is not None
    return holder


def dead_pid() -> int:
    """The pid of a process of this machine that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def write_holder(directory: Path, **fields) -> Holder:
    """A lease file in ``directory`` as another run would have left it."""
    holder = dataclasses.replace(Holder.me(time.time()), **fields)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / LEASE_NAME).write_bytes(holder.encode())
    return holder


def replace_lease(directory: Path, holder: Holder) -> None:
    """Writes ``holder``'s lease over whatever is there, as another run's takeover or heartbeat
    would (under the file's lock)."""
    store = LocalLeaseStore(directory / LEASE_NAME)
    while not store.swap(store.read(), holder.encode()):
        pass


def test_a_lease_names_its_owner_beats_and_is_gone_after_release(tmp_path: Path) -> None:
    out = tmp_path / "runs" / "x"
    lease = local_lease("output_dir", out, **FAST)
    assert lease.acquire() is None
    holder = holder_in(out)
    assert (holder.owner, holder.pid) == ("rlfleet train", os.getpid())
    time.sleep(0.3)
    assert holder_in(out).heartbeat > holder.heartbeat  # the background thread beats
    assert holder_in(out).token == holder.token
    lease.release()
    assert not (tmp_path / "runs").exists()  # made for the lease, empty: removed


def test_a_second_run_on_a_live_runs_directory_is_refused_with_one_line(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = local_lease("output_dir", out, **FAST)
    first.acquire()
    (out / "stats.jsonl").write_text("{}\n")
    second = local_lease("output_dir", out, **FAST)
    with pytest.raises(LeaseHeld) as refused:
        second.acquire()
    second.release()  # holds nothing: leaves the first's lease alone
    message = str(refused.value)
    assert "\n" not in message
    assert re.match(
        HELD.format(where=re.escape(str(out)), pid=holder_in(out).pid, beat=""), message
    )
    assert holder_in(out).token == Holder.parse(first.held).token  # type: ignore[arg-type]
    first.release()
    assert not (out / LEASE_NAME).exists()
    assert (out / "stats.jsonl").exists()  # a directory with the run's files stays


def test_runs_that_start_at_once_get_the_lease_exactly_once(tmp_path: Path) -> None:
    leases = [Lease("output_dir", "x", LocalLeaseStore(tmp_path / LEASE_NAME)) for _ in range(16)]
    won: list[Lease] = []
    refused: list[LeaseHeld] = []
    start = threading.Barrier(len(leases))

    def contend(lease: Lease) -> None:
        start.wait()
        try:
            lease.acquire()
            won.append(lease)
        except LeaseHeld as error:
            refused.append(error)

    threads = [threading.Thread(target=contend, args=(lease,)) for lease in leases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert (len(won), len(refused)) == (1, 15)
    assert holder_in(tmp_path).token == Holder.parse(won[0].held).token  # type: ignore[arg-type]
    for lease in leases:
        lease.release()
    assert not (tmp_path / LEASE_NAME).exists()


def test_the_lease_of_a_killed_run_on_this_machine_is_taken_over_at_once(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    gone = write_holder(tmp_path / "run", pid=dead_pid(), heartbeat=time.time())
    leases = JobLeases(**FAST)
    config = small_job(Path("/model"), tmp_path / "run")
    started = time.monotonic()
    leases.acquire(config)
    assert time.monotonic() - started < 1.0  # no waiting for a heartbeat
    assert holder_in(tmp_path / "run").pid != gone.pid
    assert capsys.readouterr().out.splitlines() == [
        f"output_dir: took over the lease on {tmp_path / 'run'} from rlfleet train (pid "
        f"{gone.pid} on host {gone.host}, since "
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z', time.localtime(gone.started))}), which is gone"
    ]
    leases.release()
    assert not (tmp_path / "run" / LEASE_NAME).exists()


def test_a_lease_cut_short_by_a_crash_mid_write_is_taken_over(tmp_path: Path) -> None:
    (tmp_path / LEASE_NAME).write_bytes(b'{"token": "ab')
    lease = local_lease("output_dir", tmp_path, **FAST)
    assert lease.acquire() is None
    assert holder_in(tmp_path).pid == os.getpid()
    lease.release()


def test_another_hosts_lease_is_stale_once_its_heartbeat_is_older_than_the_bound(
    tmp_path: Path,
) -> None:
    elsewhere = write_holder(tmp_path, pid_space="other-host//", heartbeat=time.time() - 5)
    lease = local_lease("output_dir", tmp_path, **FAST)
    started = time.monotonic()
    assert lease.acquire() == elsewhere
    assert time.monotonic() - started < 0.5
    lease.release()


def test_another_hosts_live_lease_is_refused_once_its_heartbeat_moves(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    holder = write_holder(tmp_path, pid=4242, host="h2", pid_space="h2//", heartbeat=time.time())
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(0.05):
            replace_lease(tmp_path, holder.beat(time.time()))

    beating = threading.Thread(target=beat)
    beating.start()
    try:
        with pytest.raises(LeaseHeld) as refused:
            local_lease("output_dir", tmp_path, **FAST).acquire()
    finally:
        stop.set()
        beating.join()
    assert re.match(
        HELD.format(where=re.escape(str(tmp_path)), pid=4242, beat=r", heartbeat \d+ s ago"),
        str(refused.value),
    ), refused.value
    assert "h2" in str(refused.value)
    waiting = capsys.readouterr().out.splitlines()
    assert len(waiting) == 1
    assert waiting[0].startswith(f"output_dir: {tmp_path} is held by rlfleet train (pid 4242 ")


def test_another_hosts_lease_whose_heartbeat_stops_is_taken_over_within_the_bound(
    tmp_path: Path,
) -> None:
    silent = write_holder(tmp_path, pid_space="h2//", heartbeat=time.time())
    lease = local_lease("output_dir", tmp_path, **FAST)
    started = time.monotonic()
    assert lease.acquire() == silent
    assert 0.9 < time.monotonic() - started < 3.0
    lease.release()


def test_a_run_whose_lease_was_taken_over_says_so_and_leaves_the_new_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lease = local_lease("output_dir", tmp_path, **FAST)
    lease.acquire()
    other = dataclasses.replace(Holder.me(time.time()), pid=4343, pid_space="h3//")
    replace_lease(tmp_path, other)  # another run took it over meanwhile
    deadline = time.monotonic() + 5
    while not lease.lost and time.monotonic() < deadline:
        time.sleep(0.02)
    assert lease.lost
    lease.release()
    assert holder_in(tmp_path) == other
    [record] = [r for r in caplog.records if r.name == "rlfleet.job.lease"]
    assert re.match(
        rf"output_dir: this run lost its lease on {re.escape(str(tmp_path))} to rlfleet train "
        r"\(pid 4343 on host .*\); two runs now write there: stop one of them$",
        record.getMessage(),
    )


def test_the_job_leases_its_output_dir_and_a_local_checkpoint_dir_once_each(
    tmp_path: Path,
) -> None:
    checkpoints = tmp_path / "checkpoints"
    config = small_job(
        Path("/model"), tmp_path / "run", checkpoint={"uri": f"file://{checkpoints}"}
    )
    with JobLeases(**FAST) as leases:
        leases.acquire(config)
        assert [lease.key for lease in leases.leases] == ["output_dir", "checkpoint.uri"]
        assert holder_in(checkpoints).token != holder_in(tmp_path / "run").token
        other = JobLeases(**FAST)
        with pytest.raises(LeaseHeld, match=r"^output_dir: "):
            other.acquire(config)
        elsewhere = config.model_copy(update={"output_dir": str(tmp_path / "run2")})
        with pytest.raises(LeaseHeld) as refused:
            other.acquire(elsewhere)
        assert str(refused.value).startswith(f"checkpoint.uri: file://{checkpoints} is in use by")
        assert str(refused.value).endswith("; stop it or choose another checkpoint.uri")
        assert not (tmp_path / "run2").exists()  # the refused run's own output_dir: not kept
    assert not (checkpoints / LEASE_NAME).exists()
    same = config.model_copy(
        update={"checkpoint": config.checkpoint.model_copy(update={"uri": str(tmp_path / "run")})}
    )
    with JobLeases(**FAST) as leases:
        leases.acquire(same)
        assert [lease.key for lease in leases.leases] == ["output_dir"]


@pytest.mark.slow
def test_an_s3_checkpoint_prefix_is_leased_exactly_once(s3_env: S3Server) -> None:
    """SeaweedFS honours ``If-None-Match: *`` and ``If-Match`` (a PUT that loses answers 412):
    of runs that start at once exactly one holds the prefix."""
    uri = f"s3://{s3_env.bucket}/lease-conditional"

    def store():
        found = s3_lease_store(uri, None)
        assert type(found).__name__ == "S3LeaseStore"
        return found

    leases = [Lease("checkpoint.uri", uri, store(), **FAST) for _ in range(6)]
    won: list[Lease] = []
    refused: list[str] = []
    start = threading.Barrier(len(leases))

    def contend(lease: Lease) -> None:
        start.wait()
        try:
            lease.acquire()
            won.append(lease)
        except LeaseHeld as error:
            refused.append(str(error))

    threads = [threading.Thread(target=contend, args=(lease,)) for lease in leases]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(won) == 1, refused
    assert all(
        line.startswith(f"checkpoint.uri: {uri} is in use by rlfleet train (pid ")
        for line in refused
    )
    time.sleep(0.3)  # beats go through the conditions too
    assert not won[0].lost
    for lease in leases:
        lease.release()
    assert store().read() is None

    gone = dataclasses.replace(Holder.me(time.time()), pid=dead_pid())
    assert store().swap(None, gone.encode())
    taker = Lease("checkpoint.uri", uri, store(), **FAST)
    assert taker.acquire() == gone
    taker.release()
    assert store().read() is None
