"""Where the members of a process group meet, listening on one address only.

torch's ``TCPStore`` server listens on every interface whatever address it is given, and gloo
listens on the interface of the machine's hostname: in a local job both must stay on loopback,
on a cluster on the node's address. ``listening_store`` serves a store on one address, and
``local_address`` with ``pin_gloo_to`` keep gloo's connections on the address that reaches it.
Used by the learner's ranks (trainers/distributed.py) and the weight group (collective.py,
job/sync.py).
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from typing import Any


def listening_store(
    host: str,
    port: int,
    world_size: int,
    timeout: timedelta,
    wait_for_workers: bool = True,
) -> Any:
    """A ``TCPStore`` server listening on ``host:port`` only (port 0: a free one, the store's
    ``port``).

    torch's server (torch 2.13, libuv and legacy alike) listens on every interface (``[::]``,
    dual-stack) whatever ``host_name`` says; given a listening socket (``master_listen_fd``) it
    serves on that one instead, so this binds it to ``host`` first. The store owns the socket
    from then on (it closes it, also when it fails to start)."""
    from torch.distributed import TCPStore

    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(socket.SOMAXCONN)
        port = sock.getsockname()[1]
    except OSError:
        sock.close()
        raise
    return TCPStore(
        host,
        port,
        world_size,
        is_master=True,
        timeout=timeout,
        wait_for_workers=wait_for_workers,
        master_listen_fd=sock.detach(),
    )


def local_address(host: str, port: int) -> str:
    """This machine's address that reaches ``host:port`` (the source address a connection there
    takes; no packet is sent): 127.0.0.1 for a store on loopback, the node's address for one on
    another node."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect(address)
        return probe.getsockname()[0]


def pin_gloo_to(address: str) -> None:
    """Makes the gloo groups this process forms later through ``torch.distributed`` (which take
    no address) listen on the interface holding ``address`` (``GLOO_SOCKET_IFNAME``), unless
    the variable is set already; nothing when no interface holds it (IPv4 only)."""
    interface = interface_of(address)
    if interface is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)


def interface_of(address: str) -> str | None:
    """The network interface whose (primary IPv4) address is ``address``, e.g. ``lo`` for
    127.0.0.1; None when none is, or on a system without ``SIOCGIFADDR`` (Linux's)."""
    import fcntl
    import struct

    get_address = 0x8915  # SIOCGIFADDR
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            request = struct.pack("256s", name.encode()[:15])
            try:
                answer = fcntl.ioctl(probe.fileno(), get_address, request)
            except OSError:
                continue  # no IPv4 address
            if socket.inet_ntoa(answer[20:24]) == address:
                return name
    return None
