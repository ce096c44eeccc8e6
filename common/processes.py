"""Files a process leaves for others to clean up once it is gone: they carry their owner, this
host's name and the process id (``owner_tag``), and whoever finds them later removes those whose
owner no longer runs (``owner_gone``). A killed process cannot clean up after itself."""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def owner_tag() -> str:
    """This process as ``<host>:<pid>``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def owner_gone(tag: str) -> bool:
    """Whether ``tag`` (``owner_tag``'s form) names a process of this host that no longer runs.
    Another host's process, or a tag of another form, cannot be checked: False."""
    host, _, pid = tag.rpartition(":")
    return host == socket.gethostname() and pid.isdigit() and not process_alive(int(pid))


def pid_named(prefix: str) -> str:
    """A name that starts with ``prefix`` and this process's pid, for a temporary directory
    that ``remove_orphans(directory, prefix)`` removes once this process is gone."""
    return f"{prefix}{os.getpid()}-"


def remove_orphans(directory: Path, prefix: str) -> list[Path]:
    """Removes the entries of ``directory`` named ``pid_named(prefix)...`` by a process of this
    host that is gone (killed before it could remove them); returns them."""
    removed = []
    for path in directory.glob(f"{prefix}*-*"):
        pid = path.name.removeprefix(prefix).partition("-")[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed
