"""A stand-in for ``vllm.LLM`` for tests of what the vLLM engine asks of it, without starting
vLLM (a mock: the arguments it was given are what these tests check)."""

from __future__ import annotations

import importlib


class RecordingLLM:
    """Stands in for ``vllm.LLM``: records its arguments, the sleep / wake-up calls and the calls
    to its workers."""

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs
        self.calls: list[str] = []
        self.rpcs: list[str] = []
        self.llm_engine = type("E", (), {"model_config": type("C", (), {"max_model_len": 128})})

    def sleep(self, level: int) -> None:
        self.calls.append(f"sleep({level})")

    def wake_up(self) -> None:
        self.calls.append("wake_up")

    def collective_rpc(self, method: str, args: tuple = ()) -> list:
        """Runs ``method`` of the engine's worker extension as vLLM does on its one worker (in
        this process), on an extension object without a worker behind it."""
        self.rpcs.append(method)
        module, _, name = self.kwargs["worker_extension_cls"].rpartition(".")
        extension = getattr(importlib.import_module(module), name)
        return [getattr(extension, method)(object.__new__(extension), *args)]
