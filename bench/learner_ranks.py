"""The learner on 1 and 2 CPU ranks, in float32 and bfloat16: step time and memory per rank.

Workload: ``bench/ppo_step.py``'s (GPT-2 with the real 50,257-token vocabulary, 4 layers x 256,
random weights; batch 32, mini-batch 8, 2 PPO epochs; the same batches and PPOConfig). Cases:

- 1 rank, float32, the plain trainer (no ``torch.distributed`` group, nothing sharded);
- 1 and 2 ranks, float32, FSDP2 over a gloo group;
- 1 and 2 ranks, bfloat16 compute on float32 master weights (FSDP2's mixed precision).

Every case runs in fresh processes (one per rank, spawned), each with ``torch`` threads = cores /
ranks, so that the cases use the same cores. Per case: one warm-up step, then ``--steps`` timed
steps on fresh batches; a step's time is the slowest rank's (the ranks start each step together).
Per rank: the median step time and process CPU time, the peak resident set size
(``ru_maxrss``, the whole process: libraries, models, optimizer state, activations) and the RSS
after the imports (what the libraries alone take), and the bytes this rank holds of the policy's
parameters (value head included), Adam's ``exp_avg`` and ``exp_avg_sq``, and the reference's
parameters (a sharded tensor counts its local shard). Ratios compare each case with its
baseline: FSDP2 on 1 rank with the plain trainer, 2 ranks with 1 rank of the same dtype; with
sharding, 2 ranks hold about half of the parameters and optimizer state each.

    .venv/bin/python bench/learner_ranks.py [--steps 3] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import resource
import statistics
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.multiprocessing as mp
from gpu_suite import free_port
from side_by_side import MIB, machine, resident_bytes, timed_steps

CASE_TIMEOUT_S = 600


@dataclass(frozen=True)
class Case:
    """One configuration of the learner: ``ranks`` processes computing in ``dtype``, in a
    ``torch.distributed`` group (FSDP2) or, with ``group`` False, the plain trainer."""

    name: str
    ranks: int
    dtype: str
    group: bool
    baseline: str | None
    """The case this one's ratios are against."""

    @property
    def threads(self) -> int:
        """torch threads per rank: this machine's cores shared among the ranks."""
        return max(1, len(os.sched_getaffinity(0)) // self.ranks)


CASES = (
    Case("1 plain fp32", 1, "float32", group=False, baseline=None),
    Case("1 fsdp fp32", 1, "float32", group=True, baseline="1 plain fp32"),
    Case("2 fsdp fp32", 2, "float32", group=True, baseline="1 fsdp fp32"),
    Case("1 fsdp bf16", 1, "bfloat16", group=True, baseline="1 fsdp fp32"),
    Case("2 fsdp bf16", 2, "bfloat16", group=True, baseline="1 fsdp bf16"),
)


def local_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of ``tensors`` held by this rank: a sharded tensor's local shard."""
    from torch.distributed.tensor import DTensor

    total = 0
    for tensor in tensors:
        local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
        total += local.numel() * local.element_size()
    return total


def optimizer_moments(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Adam's first and second moments of every parameter (made by the first step)."""
    return [
        state[key]
        for state in optimizer.state.values()
        for key in ("exp_avg", "exp_avg_sq")
        if key in state
    ]


def build_trainer(case: Case, rank: int, port: int):
    """``ppo_step.py``'s policy, reference, tokenizer and PPOConfig in a trainer laid out as
    ``case`` says (joining the group first when it has one)."""
    from ppo_step import (
        BATCH_SIZE,
        MINI_BATCH_SIZE,
        PPO_EPOCHS,
        build_policy_and_reference,
        build_tokenizer,
    )

    from rlfleet.common.config import PPOConfig
    from rlfleet.trainers.distributed import DataParallel, init_process_group
    from rlfleet.trainers.ppo import PPOTrainer

    device = torch.device("cpu")
    layout: dict[str, Any] = {}
    if case.group:
        init_process_group(rank, case.ranks, "127.0.0.1", port, device, CASE_TIMEOUT_S)
        layout = {"parallel": DataParallel.current(device), "dtype": getattr(torch, case.dtype)}
    policy, reference = build_policy_and_reference("rlfleet")
    config = PPOConfig(
        batch_size=BATCH_SIZE, mini_batch_size=MINI_BATCH_SIZE, ppo_epochs=PPO_EPOCHS
    )
    return PPOTrainer(config, policy, reference, build_tokenizer(), **layout)


def rank_main(rank: int, case: Case, port: int, steps: int, results: Any) -> None:
    """One rank of ``case``: a warm-up step, ``steps`` timed ones, then its figures to
    ``results``."""
    from ppo_step import make_batch

    torch.set_num_threads(case.threads)
    import transformers  # noqa: F401  (the libraries' share of the RSS, before any model)

    import rlfleet.trainers.ppo  # noqa: F401

    rss_after_imports = resident_bytes() / MIB
    trainer = build_trainer(case, rank, port)
    barrier = torch.distributed.barrier if case.group else None
    figures = timed_steps(lambda batch: trainer.step(*batch), make_batch, steps, barrier)
    results.put(
        {
            "rank": rank,
            **figures,
            "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_after_imports_mib": rss_after_imports,
            "param_mib": local_bytes(trainer.model.parameters()) / MIB,
            "optimizer_mib": local_bytes(optimizer_moments(trainer.optimizer)) / MIB,
            "reference_mib": local_bytes(trainer.ref_model.parameters()) / MIB,
            "torch_threads": torch.get_num_threads(),
        }
    )
    if case.group:
        torch.distributed.destroy_process_group()


def collect(results: Any, processes: list[Any], name: str) -> list[dict[str, Any]]:
    """Every rank's figures; fails as soon as a rank dies, or after ``CASE_TIMEOUT_S``."""
    figures: list[dict[str, Any]] = []
    deadline = time.monotonic() + CASE_TIMEOUT_S
    while len(figures) < len(processes):
        try:
            figures.append(results.get(timeout=1))
        except queue.Empty:
            failed = [p.exitcode for p in processes if p.exitcode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                raise RuntimeError(
                    f"{name}: ranks exited with {failed} or ran past {CASE_TIMEOUT_S} s"
                ) from None
    return figures


def run_case(case: Case, steps: int) -> dict[str, Any]:
    """``case``'s ranks in fresh processes; their figures, and the case's summary."""
    context = mp.get_context("spawn")
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=rank_main, args=(rank, case, port, steps, results))
        for rank in range(case.ranks)
    ]
    for process in processes:
        process.start()
    try:
        ranks = collect(results, processes, case.name)
    finally:
        for process in processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
    ranks.sort(key=lambda r: r["rank"])
    slowest = [max(step) for step in zip(*(r["step_s"] for r in ranks), strict=True)]
    param_optimizer = [r["param_mib"] + r["optimizer_mib"] for r in ranks]
    return {
        **asdict(case),
        "threads_per_rank": case.threads,
        "median_step_s": statistics.median(slowest),
        "median_step_cpu_s": statistics.median(ranks[0]["step_cpu_s"]),
        "median_step_peak_mib": max(statistics.median(r["step_peak_mib"]) for r in ranks),
        "maxrss_mib": max(r["maxrss_mib"] for r in ranks),
        "rss_after_imports_mib": ranks[0]["rss_after_imports_mib"],
        "param_mib": max(r["param_mib"] for r in ranks),
        "optimizer_mib": max(r["optimizer_mib"] for r in ranks),
        "reference_mib": max(r["reference_mib"] for r in ranks),
        "param_optimizer_mib": max(param_optimizer),
        "ranks_figures": ranks,
    }


COLUMNS = (
    ("case", "name", "<13"),
    ("thr", "threads_per_rank", ">3"),
    ("step s", "median_step_s", ">7.2f"),
    ("cpu s", "median_step_cpu_s", ">6.2f"),
    ("maxrss", "maxrss_mib", ">7.0f"),
    ("libs", "rss_after_imports_mib", ">5.0f"),
    ("step+", "median_step_peak_mib", ">6.0f"),
    ("params", "param_mib", ">7.1f"),
    ("adam", "optimizer_mib", ">6.1f"),
    ("ref", "reference_mib", ">6.1f"),
)
RATIOS = (
    ("step", "median_step_s"),
    ("maxrss", "maxrss_mib"),
    ("step+", "median_step_peak_mib"),
    ("p+adam", "param_optimizer_mib"),
)
LEGEND = """\
MiB per rank (the largest rank's). step s: median of the slowest rank's step time; cpu s: rank 0's
process CPU time per step; maxrss: the process's peak RSS; libs: its RSS after the imports; step+:
median peak RSS growth during a step (activations); params, adam (exp_avg + exp_avg_sq), ref: the
bytes this rank holds. Ratios: this case / the case under 'vs'."""


def table(results: list[dict[str, Any]]) -> str:
    """One row per case with its ratios to its baseline, and the legend."""
    by_name = {r["name"]: r for r in results}
    cells = [f"{title:{spec.split('.')[0]}}" for title, _, spec in COLUMNS]
    cells += [f"| {'vs':<12}"] + [f"{title:>6}" for title, _ in RATIOS]
    lines = [" ".join(cells)]
    for result in results:
        baseline = by_name.get(result["baseline"])
        cells = [f"{result[key]:{spec}}" for _, key, spec in COLUMNS]
        cells.append(f"| {result['baseline'] or '-':<12}")
        for _, key in RATIOS:
            cells.append(f"{result[key] / baseline[key]:>6.2f}" if baseline else f"{'-':>6}")
        lines.append(" ".join(cells))
    return "\n".join([*lines, LEGEND])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    print(f"machine: {machine()}, load average {os.getloadavg()[0]:.2f}", flush=True)
    results = []
    for case in CASES:
        results.append(run_case(case, args.steps))
        print(f"{case.name}: {results[-1]['median_step_s']:.2f} s/step", flush=True)
    print(table(results))
    if args.json:
        report = {"machine": machine(), "load_average": os.getloadavg(), "steps": args.steps}
        with open(args.json, "w") as file:
            json.dump({**report, "cases": results}, file, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
