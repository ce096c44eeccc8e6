"""Does asynchronous training learn as well as the synchronous loop? The GRPO arithmetic example
(examples/grpo_arithmetic.yaml) run with ``mode: sync`` and with ``mode: async`` and
``max_policy_lag`` 2, for several seeds, each as ``rlfleet train`` would run it.

Reported per run: the success rate (``reward_mean``) of the first 10 and the last 20 iterations,
the largest policy lag trained on, and the wall time; then each mode's mean and spread over the
seeds. Needs the arithmetic model (``bash scripts/grpo_demo.sh`` builds it, or ``rlfleet
tiny-model artifacts/arithmetic-model --task arithmetic``).

    .venv/bin/python bench/async_quality.py [--seeds 0 1 2] [--iterations 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "grpo_arithmetic.yaml"
MODES = {"sync": [], "async": ["mode=async", "max_policy_lag=2"]}


def run(mode: str, seed: int, iterations: int, work: Path) -> dict[str, Any]:
    out = work / f"{mode}-{seed}"
    overrides = [f"seed={seed}", f"iterations={iterations}", f"output_dir={out}", *MODES[mode]]
    command = [sys.executable, "-m", "rlfleet.cli", "train", "--config", str(CONFIG)]
    command += [arg for item in overrides for arg in ("--set", item)]
    started = time.perf_counter()
    subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    lines = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    lines = [line for line in lines if line.get("iteration", 0) > 0]
    rewards = [line["reward_mean"] for line in lines]
    lag = max(line["iteration"] - 1 - min(line["sampled_with_versions"]) for line in lines)
    return {
        "mode": mode,
        "seed": seed,
        "first_10": statistics.mean(rewards[:10]),
        "last_20": statistics.mean(rewards[-20:]),
        "max_lag": lag,
        "wall_s": round(wall, 1),
    }


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    by_mode: dict[str, Any] = {}
    for mode in MODES:
        last = [r["last_20"] for r in runs if r["mode"] == mode]
        by_mode[mode] = {
            "last_20_mean": statistics.mean(last),
            "last_20_stdev": statistics.stdev(last) if len(last) > 1 else 0.0,
        }
    return by_mode


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="rlfleet-async-quality-") as work:
        for seed in args.seeds:
            for mode in MODES:
                runs.append(run(mode, seed, args.iterations, Path(work)))
                print(json.dumps(runs[-1]), flush=True)
    report = {"runs": runs, "summary": summary(runs), "loadavg": Path("/proc/loadavg").read_text()}
    print(json.dumps(report["summary"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
