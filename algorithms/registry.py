"""Things of one kind by name, so that an algorithm is data: a few names in a config. Mostly
functions (advantage estimators, KL penalties, losses); learner/registry.py's trainer specs too."""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

F = TypeVar("F")


class Registry(dict[str, F], Generic[F]):
    """``REGISTRY[name]`` is what was registered under ``name`` with ``@REGISTRY.register``
    (or ``REGISTRY.register(name)(thing)``); an unknown name is a KeyError that lists the known
    ones."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def register(self, name: str) -> Callable[[F], F]:
        def add(function: F) -> F:
            if name in self:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self[name] = function
            return function

        return add

    def __missing__(self, name: str) -> F:
        raise KeyError(f"unknown {self.kind} {name!r}; known: {', '.join(sorted(self))}")
