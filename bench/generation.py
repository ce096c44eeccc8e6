"""vLLM generation throughput inside a Ray generator actor vs the same call in a bare process.

Both sides run the same ``GeneratorActor.generate`` on the same Arrow prompt batch with the same
engine settings: once on a plain ``GeneratorActor`` in a bare child process (no Ray in it),
once through Ray on a ``RemoteGenerator`` actor (``num_cpus`` from the config). Both are timed
from this process; the actor side includes Ray's call and the transfer of the result batch.
Sides alternate run by run so that load from other processes on a shared machine hits both
alike. Target: actor >= 0.9x bare.

Ray sets ``OMP_NUM_THREADS`` to an actor's ``num_cpus``; the bare process runs twice, with the
actor's thread count (the like-for-like baseline) and with OpenMP's default of every core,
which on a loaded 2-core machine is far slower (spinning OpenMP threads wait on each other).

    .venv/bin/python bench/generation.py [--prompts 64] [--tokens 32] [--runs 15] [--engine vllm|hf]
"""

from __future__ import annotations

import argparse
import atexit
import multiprocessing as mp
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pyarrow as pa  # noqa: E402
import ray  # noqa: E402

from rlfleet.actors.generator import GeneratorActor, RemoteGenerator, generator_options  # noqa: E402
from rlfleet.common.config import GeneratorConfig  # noqa: E402
from rlfleet.common.schema import prompt_batch  # noqa: E402
from rlfleet.tasks.tiny_model import build_tiny_model  # noqa: E402


def make_prompts(model_dir: Path, n: int) -> pa.RecordBatch:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    texts = [f"review {i}: the film was" for i in range(n)]
    return prompt_batch(list(range(n)), texts, tokenizer(texts).input_ids)


def count_tokens(batch: pa.RecordBatch) -> int:
    return sum(len(ids) for ids in batch.column("response_ids").to_pylist())


def serve_bare(connection: Connection, model_dir: str, config: GeneratorConfig) -> None:
    """The bare process: a plain ``GeneratorActor``; each batch received is generated for and
    answered with its number of new tokens."""
    generator = GeneratorActor(0, model_dir, config, 0)
    connection.send("ready")
    while (batch := connection.recv()) is not None:
        connection.send(count_tokens(generator.generate(batch)))


def tokens_per_second(generate: Callable[[], int]) -> float:
    start = time.perf_counter()
    tokens = generate()
    return tokens / (time.perf_counter() - start)


def bare_side(
    model_dir: Path, config: GeneratorConfig, omp_threads: str | None
) -> tuple[Connection, mp.Process]:
    """Start the bare process, with ``OMP_NUM_THREADS`` set to ``omp_threads`` (None: unset,
    so OpenMP uses every core)."""
    context = mp.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=serve_bare, args=(theirs, str(model_dir), config), daemon=True)
    saved = os.environ.pop("OMP_NUM_THREADS", None)
    if omp_threads is not None:
        os.environ["OMP_NUM_THREADS"] = omp_threads
    try:
        process.start()
    finally:
        os.environ.pop("OMP_NUM_THREADS", None)
        if saved is not None:
            os.environ["OMP_NUM_THREADS"] = saved
    if ours.recv() != "ready":
        raise RuntimeError("the bare generator process did not start")
    return ours, process


def asking(connection: Connection, batch: pa.RecordBatch) -> Callable[[], int]:
    def generate() -> int:
        connection.send(batch)
        return connection.recv()

    return generate


def measure(sides: dict[str, Callable[[], int]], runs: int) -> dict[str, list[float]]:
    """Tokens per second of each side, ``runs`` times, the sides alternating, after a warm-up."""
    for generate in sides.values():
        generate()
    rates: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(runs):
        for name, generate in sides.items():
            rates[name].append(tokens_per_second(generate))
    return rates


def median_round_trip_ms(actor: ray.actor.ActorHandle, calls: int = 20) -> float:
    """Ray's own cost per call: the median round trip of a call that does nothing."""
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        ray.get(actor.ready.remote())
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--engine", choices=["vllm", "hf"], default="vllm")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-generation-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    os.environ["TMPDIR"] = str(work)
    model_dir = build_tiny_model(work / "model")
    config = GeneratorConfig(
        engine=args.engine, max_new_tokens=args.tokens, num_cpus=1, kv_cache_gib=0.25
    )
    batch = make_prompts(model_dir, args.prompts)

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        actor = RemoteGenerator.options(**generator_options(config)).remote(
            0, str(model_dir), config, 0
        )
        ray.get(actor.ready.remote())
        threads = str(max(1, int(config.num_cpus)))
        like_for_like = f"bare, OMP_NUM_THREADS={threads}"
        bare = {
            "bare, OMP threads unset": bare_side(model_dir, config, None),
            like_for_like: bare_side(model_dir, config, threads),
        }
        sides = {name: asking(connection, batch) for name, (connection, _) in bare.items()}
        sides[f"Ray actor, num_cpus={config.num_cpus:g}"] = lambda: count_tokens(
            ray.get(actor.generate.remote(batch))
        )
        rates = measure(sides, args.runs)
        round_trip_ms = median_round_trip_ms(actor)
        for connection, process in bare.values():
            connection.send(None)
            process.join()
    finally:
        ray.shutdown()

    print(
        f"\n{args.engine} generation, {args.prompts} prompts x {args.tokens} new tokens, "
        f"median of {args.runs} runs (tiny GPT-2, {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f})"
    )
    print_table(rates, baseline=like_for_like)
    print(f"Ray round trip of a no-op actor call: {round_trip_ms:.1f} ms (median)")


def print_table(rates: dict[str, list[float]], baseline: str) -> None:
    medians = {name: statistics.median(values) for name, values in rates.items()}
    print(f"{'side':<28}{'tokens/s':>10}{'min':>10}{'max':>10}{'ratio':>8}")
    for name, values in rates.items():
        ratio = medians[name] / medians[baseline]
        print(
            f"{name:<28}{medians[name]:>10.0f}{min(values):>10.0f}{max(values):>10.0f}"
            f"{ratio:>7.2f}x"
        )
    print(f"(ratio: to '{baseline}', the bare process with the actor's thread count)")


if __name__ == "__main__":
    main()
