"""Start-up time of the demo job: from the command to its first iteration, with a breakdown.

Runs ``rlfleet train --config examples/demo.yaml --set iterations=2`` (the README's command,
with scripts/demo.sh's environment; build the model first: ``scripts/demo.sh`` does) ``--runs``
times, each in a fresh ``output_dir``, with ``RLFLEET_STARTUP_TRACE`` pointing at a trace file
(common/startup_trace.py), and prints each milestone's offset from the command's start (the
moment before the process is spawned): the median over the runs, and each run's::

    .venv/bin/python bench/startup.py [--runs 3] [--set k=v ...] [--variant NAME:K=V,K=V ...]
    .venv/bin/python bench/startup.py --imports   # the driver's slowest imports (-X importtime)

Milestones (driver: the ``rlfleet`` process; actors: Ray's task events and their own marks):

- ``python started``: the first line of ``rlfleet/cli.py`` runs (interpreter and site are up);
- ``imports done``: the command line is parsed (every module the command needs is imported);
- ``checks done``: the config, the dataset, the eval prompts, the leases and the resume point
  are checked (everything that happens before Ray starts);
- ``ray.init done``: the local Ray instance is up;
- ``<Actor>.__init__ began/ended``: each actor's constructor (the gap before ``began`` is Ray
  starting its worker process and importing the actor's module); ``vllm engine: ...`` and
  ``learner: ...`` split the generator's and the learner's constructors;
- ``first dispatch``: the first batch goes to the generators: **the first iteration starts**;
- ``first iteration done``: the first line of ``stats.jsonl`` exists (iteration 1's stats;
  the demo evaluates nothing before it): what a user sees first;
- ``exit``: the command returned (2 iterations and shutdown).

``--variant NAME:K=V,...`` adds a variant run with those environment variables (e.g.
``PYTHONPATH`` pointing at another checkout, or a ``RAY_...`` setting); the runs of the variants
alternate, so that a machine whose load changes affects each alike. The load average at each
run's start is printed with it: compare only runs taken under similar load.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from rlfleet.common import startup_trace

REPO = Path(__file__).resolve().parents[1]

DEMO_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
}
"""What scripts/demo.sh exports before it runs the job."""

FIRST_ITERATION = "first iteration done"
EXIT = "exit"


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def milestone_names(
    trace: list[tuple[float, int, float, str]],
) -> list[tuple[float, float, str]]:
    """The trace's milestones (time, process CPU, name) without Ray worker ids, a repeated one
    numbered (``#2`` ...)."""
    seen: Counter[str] = Counter()
    named = []
    for at, _, cpu, milestone in trace:
        name = re.sub(r" \(worker \w+\)$", "", milestone)
        seen[name] += 1
        named.append((at, cpu, name if seen[name] == 1 else f"{name} #{seen[name]}"))
    return named


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (through /proc's children lists)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                todo.extend(int(c) for c in (task / "children").read_text().split())
            except OSError:
                continue
    return found


def process_label(pid: int) -> str:
    """A process's kind: the driver, a Ray process (gcs_server, raylet, dashboard.py, agents,
    ...), or a worker by its title (``ray::IDLE``, ``ray::RemoteGenerator`` ...)."""
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    first = argv[0].decode(errors="replace")
    if first.startswith("ray::"):
        return first.split()[0]
    scripts = [a.decode(errors="replace") for a in argv[:3] if a.endswith((b".py", b"rlfleet"))]
    return Path(scripts[0] if scripts else first).name


class CpuSampler:
    """The CPU seconds (user + system) of every process of the job's tree, as last seen: a
    process is sampled until it is gone (a Ray worker's last fraction of a second is lost)."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.seen: dict[int, tuple[str, float]] = {}
        self.until: float | None = None

    def sample(self) -> None:
        for pid in descendants(self.root):
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
                cpu = (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
                label = process_label(pid) if pid != self.root else "driver (rlfleet train)"
            except (OSError, IndexError, ValueError):
                continue
            self.seen[pid] = (label, cpu)

    def by_label(self) -> dict[str, float]:
        totals: Counter[str] = Counter()
        for label, cpu in self.seen.values():
            totals[label] += cpu
        return dict(totals)


Run = tuple[dict[str, float], dict[str, float], dict[str, float]]
"""One run: each milestone's offset from the command's start, the CPU seconds of each kind of
process up to the first iteration, and the CPU seconds of its process at each milestone."""


def run_once(config: str, overrides: list[str], env: dict[str, str], timeout_s: float) -> Run:
    """One run of the job (see ``Run``)."""
    work = Path(tempfile.mkdtemp(prefix="rlfleet-startup-"))
    trace, stats = work / "trace", work / "run" / "stats.jsonl"
    command = [
        str(Path(sys.executable).with_name("rlfleet")),
        "train",
        "--config",
        config,
        *(arg for override in overrides for arg in ("--set", override)),
        "--set",
        f"output_dir={work / 'run'}",
    ]
    environment = {**os.environ, **DEMO_ENV, **env, startup_trace.TRACE_VARIABLE: str(trace)}
    started = time.time()
    process = subprocess.Popen(
        command, cwd=REPO, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    first_line, cpu, last_sample = None, CpuSampler(process.pid), 0.0
    while process.poll() is None:
        if first_line is None and stats.exists() and stats.stat().st_size:
            first_line = time.time()
            cpu.sample()
            first_cpu = cpu.by_label()
        if first_line is None and time.time() - last_sample > 0.2:
            cpu.sample()
            last_sample = time.time()
        if time.time() - started > timeout_s:
            process.kill()
        time.sleep(0.02)
    ended = time.time()
    output = process.stdout.read().decode(errors="replace") if process.stdout else ""
    if process.returncode != 0:
        raise RuntimeError(f"the job exited with {process.returncode}:\n{output[-3000:]}")
    milestones = milestone_names(startup_trace.read(trace))
    offsets = {name: at - started for at, _, name in milestones}
    process_cpu = {name: cpu for _, cpu, name in milestones if cpu >= 0}
    if first_line is not None:
        offsets[FIRST_ITERATION] = first_line - started
    offsets[EXIT] = ended - started
    return offsets, first_cpu if first_line is not None else cpu.by_label(), process_cpu


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, assignments = text.partition(":")
    env = dict(item.split("=", 1) for item in assignments.split(",") if item)
    return name, env


def print_table(title: str, loads: list[str], columns: list[dict[str, float]]) -> None:
    """Each row (in the order of its median) with its median and every run's value."""
    names = {name for column in columns for name in column}
    medians = {name: statistics.median(c[name] for c in columns if name in c) for name in names}
    print(f"\n== {title}, {len(columns)} runs (load average at each start: {'; '.join(loads)})")
    runs = " ".join(f"{f'run {i + 1}':>6}" for i in range(len(columns)))
    print(f"{'':<48} {'median':>7}  {runs}")
    for name in sorted(names, key=medians.__getitem__):
        cells = " ".join(f"{c[name]:6.2f}" if name in c else f"{'-':>6}" for c in columns)
        print(f"{name:<48} {medians[name]:7.2f}  {cells}")


def print_results(variant: str, runs: list[tuple[str, Run]]) -> None:
    loads = [load for load, _ in runs]
    print_table(f"{variant}: seconds from the command's start", loads, [r[0] for _, r in runs])
    cpu = [{**r[1], "all processes": sum(r[1].values())} for _, r in runs]
    print_table(f"{variant}: CPU seconds of each process up to the first iteration", loads, cpu)
    print_table(
        f"{variant}: CPU seconds of its process at each mark", loads, [r[2] for _, r in runs]
    )


def slowest_imports(top: int) -> None:
    """The driver's imports (those of ``rlfleet train``'s command line) by cumulative time."""
    code = "from rlfleet.cli import build_parser; build_parser()"
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code],
        cwd=REPO.parent,
        capture_output=True,
        text=True,
        check=True,
    )
    rows = []
    for line in result.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, cumulative, name = line.split("|")
        depth = (len(name) - len(name.lstrip(" ")) - 1) // 2
        rows.append((int(cumulative), depth, name.strip()))
    total = sum(us for us, depth, _ in rows if depth == 0)
    print(f"driver imports: {total / 1e6:.2f} s in all (-X importtime; load {load_average()})")
    for us, depth, name in sorted(rows, reverse=True)[:top]:
        print(f"{us / 1e6:7.2f} s  {'  ' * depth}{name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--config", default="examples/demo.yaml")
    parser.add_argument("--iterations", type=int, default=2)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--variant", action="append", default=[], metavar="NAME:K=V,K=V")
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--imports", action="store_true", help="only the driver's imports")
    parser.add_argument("--top", type=int, default=25, help="imports listed with --imports")
    args = parser.parse_args()
    if args.imports:
        slowest_imports(args.top)
        return
    variants = [("as is", {})] + [parse_variant(v) for v in args.variant]
    overrides = [f"iterations={args.iterations}", *args.overrides]
    results: dict[str, list[tuple[str, Run]]] = {name: [] for name, _ in variants}
    for run in range(args.runs):
        for name, env in variants:
            load = load_average()
            result = run_once(args.config, overrides, env, args.timeout_s)
            results[name].append((load, result))
            print(
                f"run {run + 1} {name}: first iteration done at "
                f"{result[0].get(FIRST_ITERATION, float('nan')):.2f} s (load {load})",
                flush=True,
            )
    for name, runs in results.items():
        print_results(name, runs)


if __name__ == "__main__":
    main()
