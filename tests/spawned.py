"""Spawned processes for multi-rank tests (torch.distributed groups), never left hanging."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp


def run_spawned(
    fn: Callable[..., None], args: tuple[Any, ...], nprocs: int, timeout_s: float, what: str
) -> None:
    """``fn(rank, *args)`` in ``nprocs`` spawned processes. A process that raises fails the call
    with its error; ``TimeoutError`` naming ``what`` if they are not all done in ``timeout_s``;
    any process still alive at the end is killed."""
    context = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{nprocs} ranks did not finish {what} in {timeout_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
