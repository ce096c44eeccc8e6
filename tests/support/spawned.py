"""Spawned processes for multi-rank tests (torch.distributed groups), never left hanging.

The ranks start from a forkserver that imports torch, transformers and rlfleet's learner once
per test session: a rank is a fork of it, so it pays none of those imports (about 5 s of CPU
per process; under ``spawn`` every rank of every group paid them) and yet, as with ``spawn``,
inherits no threads, process group or Ray state of the pytest process. tests/conftest.py
starts the forkserver once collection is done when a collected module imports this one, so its
imports run beside the tests that come first. It keeps the environment of that moment: a rank
sees no environment variable a test set later, so pass what a rank needs in its arguments (it
still gets the test's ``sys.path``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from multiprocessing import forkserver
from typing import Any

import torch.multiprocessing as mp

PRELOADED = (
    "pytest",
    "torch",
    "torch.distributed.fsdp",
    "transformers",
    "safetensors.torch",
    "rlfleet.trainers.ppo",
    "rlfleet.trainers.critic_free",
    "rlfleet.checkpoint.saver",
    "rlfleet.checkpoint.load",
    "rlfleet.trainers.distributed",
)
"""Imported by the forkserver before it forks any rank (a module that fails to import is left
to the rank, which then fails on it as it would under ``spawn``)."""


def start_forkserver() -> None:
    """Starts the forkserver (no-op once running); it imports ``PRELOADED`` in the background."""
    forkserver.set_forkserver_preload(list(PRELOADED))
    forkserver.ensure_running()


def run_spawned(
    fn: Callable[..., None], args: tuple[Any, ...], nprocs: int, timeout_s: float, what: str
) -> None:
    """``fn(rank, *args)`` in ``nprocs`` processes forked from the forkserver. A process that
    raises fails the call with its error; ``TimeoutError`` naming ``what`` if they are not all
    done in ``timeout_s``; any process still alive at the end is killed."""
    start_forkserver()
    context = mp.start_processes(
        fn, args=args, nprocs=nprocs, join=False, start_method="forkserver"
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{nprocs} ranks did not finish {what} in {timeout_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
