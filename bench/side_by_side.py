"""What the side-by-side benchmarks share: the machine they ran on, running one side (rlfleet
or the peer) of a benchmark script in that side's own virtualenv, alternating the sides over
rounds, and timing a step's wall time, CPU time and peak memory."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
MIB = 2**20


def machine() -> str:
    """CPU count and model, as the closing notes quote them."""
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {model}"


def run_side(
    python: Path,
    script: str | Path,
    impl: str,
    steps: int,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Runs ``script --impl impl --json --steps steps`` with ``python`` (in ``env``, by default
    this process's); its last JSON line."""
    command = [str(python), str(Path(script).resolve()), "--impl", impl, "--json"]
    command += ["--steps", str(steps)]
    output = subprocess.run(
        command, check=True, capture_output=True, text=True, cwd=ROOT, env=env
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def alternate(
    sides: Iterable[str],
    rounds: int,
    run: Callable[[str], dict[str, Any]],
    row: Callable[[int, str, dict[str, Any]], str],
) -> dict[str, list[dict[str, Any]]]:
    """Runs every side (``run(side)``: its result) ``rounds`` times, the order reversed every
    other round, printing ``row(round, side, result)`` after each run; returns each side's
    results, round by round."""
    results: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
    for round_index in range(rounds):
        order = list(results) if round_index % 2 == 0 else list(reversed(results))
        for side in order:
            result = run(side)
            results[side].append(result)
            print(row(round_index, side, result), flush=True)
    return results


def median_ratio(
    ours: list[dict[str, Any]],
    theirs: list[dict[str, Any]],
    key: str | Callable[[dict[str, Any]], float],
) -> float:
    """The median over the rounds of our figure / theirs: ``key`` names it in each result, or
    computes it from one."""
    figure = key if callable(key) else (lambda result: result[key])
    return statistics.median(figure(o) / figure(t) for o, t in zip(ours, theirs, strict=True))


def resident_bytes() -> int:
    """This process's resident set size."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_BYTES


class PeakRss:
    """Highest resident set size seen by a 2 ms sampling thread while the block runs."""

    def __enter__(self) -> PeakRss:
        self.start = resident_bytes()
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, resident_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident_bytes())


def timed_steps(
    step: Callable[[Any], object],
    batch: Callable[[int], Any],
    steps: int,
    before_each: Callable[[], object] | None = None,
) -> dict[str, list[float]]:
    """``step(batch(0))`` as the warm-up, then ``steps`` timed steps on ``batch(1)`` ... (each
    made before its step's clock starts; ``before_each`` runs then too): each step's wall
    seconds (``step_s``), process CPU seconds (``step_cpu_s``) and peak RSS growth over the RSS
    just before it, in MiB (``step_peak_mib``)."""
    step(batch(0))
    figures: dict[str, list[float]] = {"step_s": [], "step_cpu_s": [], "step_peak_mib": []}
    for index in range(1, steps + 1):
        inputs = batch(index)
        if before_each is not None:
            before_each()
        with PeakRss() as rss:
            start, cpu_start = time.perf_counter(), time.process_time()
            step(inputs)
            figures["step_s"].append(time.perf_counter() - start)
            figures["step_cpu_s"].append(time.process_time() - cpu_start)
        figures["step_peak_mib"].append((rss.peak - rss.start) / MIB)
    return figures
