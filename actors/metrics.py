"""The generator actor's Prometheus metrics (served and found as ``common/metrics.py`` says)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from rlfleet.common.metrics import MetricSet, check_non_negative


class GeneratorMetrics(MetricSet):
    role = "generator"

    def __init__(self, job: str, index: int = 0) -> None:
        super().__init__(job, index)
        self._rollouts = self._counter("rlfleet_generator_rollouts_total", "Rollouts generated.")
        self._tokens = self._counter("rlfleet_generator_tokens_total", "Response tokens generated.")
        self._latency = self._histogram(
            "rlfleet_generator_generation_seconds", "Seconds per generate call."
        )
        self._version = self._gauge(
            "rlfleet_generator_policy_version", "Policy version the generator samples with."
        )
        self._weight_load = self._histogram(
            "rlfleet_generator_weight_load_seconds", "Seconds to load new weights in place."
        )
        self._busy = self._gauge("rlfleet_generator_busy", "1 while generating, 0 while idle.")

    def record_generation(self, rollouts: int, tokens: int, seconds: float) -> None:
        """One generate call: ``rollouts`` responses with ``tokens`` response tokens in all."""
        check_non_negative("rollouts", rollouts)
        check_non_negative("tokens", tokens)
        check_non_negative("seconds", seconds)
        self._rollouts.inc(rollouts)
        self._tokens.inc(tokens)
        self._latency.observe(seconds)

    def record_weight_load(self, seconds: float, version: int) -> None:
        """Weights of ``version`` loaded in place in ``seconds``; the generator now holds it."""
        check_non_negative("seconds", seconds)
        self._weight_load.observe(seconds)
        self._version.set(version)

    @contextmanager
    def busy(self) -> Iterator[None]:
        """Marks the generator busy for the duration of the block."""
        self._busy.set(1)
        try:
            yield
        finally:
            self._busy.set(0)
