"""Time per PPO iteration, split into generate / score / train / sync, for 1 and 3 generators.

Runs the demo job (``examples/demo.yaml`` unless ``--config``) on one local Ray instance, once
per generator count, and prints the median of each part over the iterations after the first
(which includes engine warm-up). Also prints the 3-vs-1 ratio (sync target: <= 1.5x, one put
read by every generator)::

    .venv/bin/python bench/iteration.py [--iterations 8] [--generators 1 3] [--set k=v ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

PARTS = ("generate", "score", "train", "sync")


def median_parts(stats: list[dict]) -> dict[str, float]:
    steady = stats[1:] or stats
    medians = {part: statistics.median(s[f"time/{part}_s"] for s in steady) for part in PARTS}
    medians["total"] = statistics.median(sum(s[f"time/{p}_s"] for p in PARTS) for s in steady)
    return medians


def bench(config_path: str, generators: list[int], iterations: int, overrides: list[str]):
    import ray

    from rlfleet.common.config_file import load_job_config
    from rlfleet.job.cluster import init_ray, required_cpus
    from rlfleet.job.train import run_job

    configs = {
        n: load_job_config(
            config_path,
            [
                *overrides,
                f"generators.num_actors={n}",
                f"iterations={iterations}",
                f"output_dir={tempfile.mkdtemp(prefix=f'bench-iteration-{n}-')}",
            ],
        )
        for n in generators
    }
    init_ray(max(configs.values(), key=required_cpus))
    results = {}
    try:
        for n, config in configs.items():
            started = time.perf_counter()
            result = run_job(config)
            results[n] = (median_parts(result.stats), time.perf_counter() - started)
    finally:
        ray.shutdown()
    return results


def print_table(results: dict[int, tuple[dict[str, float], float]], samples: int) -> None:
    header = f"{'generators':>10} " + " ".join(f"{p + '_s':>11}" for p in (*PARTS, "total"))
    print(f"median seconds per iteration ({samples} prompts per batch)")
    print(header + f" {'job_wall_s':>11}")
    for n, (medians, wall) in results.items():
        cells = " ".join(f"{medians[p]:11.3f}" for p in (*PARTS, "total"))
        print(f"{n:>10} {cells} {wall:11.1f}")
    if len(results) > 1:
        low, high = min(results), max(results)
        ratios = " ".join(
            f"{results[high][0][p] / results[low][0][p]:11.2f}" for p in (*PARTS, "total")
        )
        print(f"{f'{high}/{low}':>10} {ratios}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="examples/demo.yaml")
    parser.add_argument("--generators", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rlfleet.common.config_file import load_job_config

    samples = load_job_config(args.config, args.overrides).ppo.batch_size
    print_table(bench(args.config, args.generators, args.iterations, args.overrides), samples)


if __name__ == "__main__":
    main()
