"""What a local job listens on: 127.0.0.1 only. The weight group's store (served by the driver)
and its gloo connections, and the learner ranks' ``torch.distributed`` group (rank 0's store,
every rank's gloo connections), read back from ``/proc/<pid>/net/tcp{,6}``.

torch's own ``TCPStore`` server listens on every interface whatever address it is given (the
first test shows it, so that a torch that changes this is noticed); rlfleet hands it a socket
bound to the address instead (``listening_store``)."""

from __future__ import annotations

import json
import os
import socket
import threading
from datetime import timedelta
from pathlib import Path

import pytest
import torch
from support.ports import free_ports
from support.spawned import run_spawned
from torch.distributed import TCPStore

from rlfleet.common.transport import GroupSpec
from rlfleet.common.transport.collective import CollectivePublisher, CollectiveReceiver
from rlfleet.common.transport.rendezvous import interface_of, listening_store, local_address
from rlfleet.trainers.distributed import init_process_group

pytestmark = pytest.mark.skipif(not Path("/proc/self/net/tcp").exists(), reason="needs /proc")

LOOPBACK = "127.0.0.1"


def listening(pid: int | str = "self") -> set[tuple[str, int]]:
    """The (address, port) of every TCP socket process ``pid`` holds in the listening state."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue  # closed meanwhile
        if target.startswith("socket:["):
            inodes.add(target[len("socket:[") : -1])
    found = set()
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        path = Path(f"/proc/{pid}/net/{table}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and inode in inodes:  # 0A: TCP_LISTEN
                address, port = local.split(":")
                raw = bytes.fromhex(address)
                raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
                found.add((socket.inet_ntop(family, raw), int(port, 16)))
    return found


def test_torchs_own_store_server_listens_on_every_interface():
    """Why rlfleet binds the store's socket itself: torch 2.13's server takes ``127.0.0.1`` as
    the address to reach, not to listen on."""
    store = TCPStore(LOOPBACK, 0, 1, True, timeout=timedelta(seconds=5), wait_for_workers=False)
    addresses = {address for address, port in listening() if port == store.port}
    assert addresses and addresses <= {"::", "0.0.0.0"}


def test_the_weight_groups_store_and_gloo_connections_listen_on_loopback_only():
    """The driver's store as job/sync.py serves it (a free port, no wait for the members),
    joined by the learner's sender and two generators (threads here, processes in a job)."""
    before = listening()
    store = listening_store(LOOPBACK, 0, 3, timedelta(seconds=10), wait_for_workers=False)
    spec = GroupSpec(LOOPBACK, store.port, 3, 1, "gloo", 10.0)
    publisher, receivers = CollectivePublisher(), [CollectiveReceiver(), CollectiveReceiver()]
    errors: list[BaseException] = []

    def join(call) -> None:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - the test reports it
            errors.append(exc)

    calls = [lambda: publisher.join(spec)]
    calls += [lambda r=r, i=i: r.join(spec, i + 1) for i, r in enumerate(receivers)]
    threads = [threading.Thread(target=join, args=(call,)) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors and not any(thread.is_alive() for thread in threads)
    opened = listening() - before
    assert (LOOPBACK, store.port) in opened
    assert len(opened) > 1  # gloo's connections too
    assert {address for address, _ in opened} == {LOOPBACK}
    for end in (publisher, *receivers):
        end.close()


def test_the_address_that_reaches_loopback_is_loopback_on_lo():
    assert local_address(LOOPBACK, 1) == LOOPBACK
    assert interface_of(LOOPBACK) == "lo"
    assert interface_of("192.0.2.1") is None  # TEST-NET-1: no interface holds it


def record_listeners(rank: int, world_size: int, port: int, out: str) -> None:
    """One learner rank (spawned): joins the group as a job's rank does, all-reduces once,
    and writes what it listens on (and gloo's interface) to ``out/<rank>.json``."""
    init_process_group(rank, world_size, LOOPBACK, port, torch.device("cpu"), timeout_s=60.0)
    total = torch.ones(1)
    torch.distributed.all_reduce(total)
    record = {
        "listening": sorted(listening()),
        "sum": total.item(),
        "gloo_interface": os.environ.get("GLOO_SOCKET_IFNAME"),
    }
    Path(out, f"{rank}.json").write_text(json.dumps(record))
    torch.distributed.barrier()  # every rank recorded before rank 0's store goes
    torch.distributed.destroy_process_group()


def test_learner_ranks_listen_on_loopback_only(tmp_path: Path):
    [port] = free_ports(1)
    pinned = "GLOO_SOCKET_IFNAME" in os.environ
    run_spawned(record_listeners, (2, port, str(tmp_path)), 2, 120, "joining the group")
    records = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in range(2)]
    assert [record["sum"] for record in records] == [2.0, 2.0]
    assert [LOOPBACK, port] in records[0]["listening"]  # rank 0 serves the store
    for record in records:
        assert record["listening"]  # gloo's connections, the store
        assert {address for address, _ in record["listening"]} == {LOOPBACK}
        if not pinned:
            assert record["gloo_interface"] == "lo"
