"""New weights that arrive while a generator samples (asynchronous mode): loaded between two
engine steps, by the sampling thread, instead of after the whole batch.

A generator in asynchronous mode runs two calls at a time (a threaded Ray actor): ``generate``
and ``load_weights``. The engine is used by one thread at a time: ``generating`` holds it for the
whole sampling call, and a ``load_weights`` that arrives meanwhile leaves its weights here
(``load``) and waits; the sampling thread takes them at its next step boundary (``take``), stops
its requests where they are, loads the weights and continues the requests from their prefixes
(actors/rollout.py ``interrupt`` and ``resume``). Weights that arrive while nothing samples load
at once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

Load = Callable[[Any], int]
"""Loads one weights handle into the engine; returns the policy version now held."""


class PendingWeights:
    """One weights handle waiting for the sampling thread; its loader waits on ``result``."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self._done = threading.Event()
        self._version: int | None = None
        self._error: BaseException | None = None

    def run(self, load: Load) -> None:
        try:
            self._version = load(self.handle)
        except BaseException as error:  # noqa: BLE001 - handed to the waiting caller
            self._error = error
        finally:
            self._done.set()

    def result(self) -> int:
        self._done.wait()
        if self._error is not None:
            raise self._error
        assert self._version is not None
        return self._version


class WeightHandoff:
    def __init__(self) -> None:
        self._engine = threading.Lock()
        self._state = threading.Lock()
        self._sampling = False
        self._pending: PendingWeights | None = None

    @contextmanager
    def generating(self, load: Load) -> Iterator[None]:
        """Holds the engine for one sampling call; weights left meanwhile and not taken yet load
        before it returns."""
        with self._engine:
            with self._state:
                self._sampling = True
            try:
                yield
            finally:
                with self._state:
                    self._sampling = False
                    pending, self._pending = self._pending, None
                if pending is not None:
                    pending.run(load)

    def take(self) -> PendingWeights | None:
        """The weights waiting for the sampling thread, if any."""
        with self._state:
            pending, self._pending = self._pending, None
        return pending

    def load(self, handle: Any, load: Load) -> int:
        """Loads ``handle`` now when nothing samples, else hands it to the sampling thread and
        waits until that loaded it."""
        while True:
            with self._state:
                if self._sampling:
                    pending = self._pending = PendingWeights(handle)
                    break
                if self._engine.acquire(blocking=False):
                    pending = None
                    break
            time.sleep(0.005)  # a sampling call is just ending: it releases the engine soon
        if pending is not None:
            return pending.result()
        try:
            return load(handle)
        finally:
            self._engine.release()
