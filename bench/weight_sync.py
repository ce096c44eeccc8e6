"""Weight sync time to 1 vs 3 generator actors: one pack and put, N readers loading in place.

One sync is what the job does after each PPO step: publish the new policy through the
object-store transport (``common/transport/object_store.py``: pack it, ``ray.put`` it once), call
every generator's ``load_weights`` with the one handle and wait until all hold the new version.
Times are split into pack + put (learner side, once) and load (until the last generator has
loaded). 1-generator and 3-generator syncs alternate run by run so that load from other processes
on a shared machine hits both alike. Target: 3 generators <= 1.5x 1.

The in-place reload is CPU work in each generator (vLLM's layerwise reload and CPU GEMM
repacking), so on C cores 3 reloads take at least 3/min(3, C) times one: 1.5x on 2 cores,
before any load from other processes.

A second table times only the transfer, for the packed format and for a plain state dict of
torch tensors put as is: N reader actors ``ray.get`` the object and sum its tensors.

    .venv/bin/python bench/weight_sync.py [--n-embd 256] [--n-layer 4] [--runs 9] [--engine vllm|hf]
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ray  # noqa: E402
import torch  # noqa: E402

from rlfleet.actors.generator import start_generators  # noqa: E402
from rlfleet.common.config import GeneratorConfig  # noqa: E402
from rlfleet.common.tiny_model import build_tiny_model  # noqa: E402
from rlfleet.common.transport.object_store import ObjectStorePublisher  # noqa: E402
from rlfleet.common.transport.packing import pack_state_dict, unpack  # noqa: E402

COUNTS = (1, 3)


@ray.remote(num_cpus=1)
class Reader:
    """Reads a broadcast object the way a generator would, without loading it anywhere."""

    def read(self, wrapped: list) -> float:
        obj = ray.get(wrapped[0])
        tensors = [t for _, t in unpack(obj)] if not isinstance(obj, dict) else obj.values()
        return float(sum(t.float().sum() for t in tensors))


def perturbed(state_dict: dict[str, torch.Tensor], version: int) -> dict[str, torch.Tensor]:
    """New weights per sync, as after an optimizer step (ties kept)."""
    torch.manual_seed(version)
    with torch.no_grad():
        for tensor in {t.data_ptr(): t for t in state_dict.values()}.values():
            tensor.add_(torch.randn_like(tensor), alpha=1e-3)
    return state_dict


def sync(
    generators: list, state_dict: dict[str, torch.Tensor], version: int
) -> tuple[float, float]:
    """One sync: (seconds to pack and put, seconds until every generator loaded it)."""
    start = time.perf_counter()
    handle = ObjectStorePublisher().publish(state_dict, version)
    put_done = time.perf_counter()
    versions = ray.get([g.load_weights.remote(handle) for g in generators])
    done = time.perf_counter()
    if versions != [version] * len(generators):
        raise RuntimeError(f"generators hold versions {versions}, expected {version}")
    return put_done - start, done - put_done


def transfer_seconds(readers: list, obj: object) -> float:
    """Seconds from one put until ``readers`` have all read ``obj``."""
    start = time.perf_counter()
    ref = ray.put(obj)
    ray.get([reader.read.remote([ref]) for reader in readers])
    return time.perf_counter() - start


def median_ms(values: list[float]) -> float:
    return 1000 * statistics.median(values)


def bench_syncs(model_dir: Path, args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM

    config = GeneratorConfig(
        engine=args.engine, num_actors=max(COUNTS), num_cpus=1, kv_cache_gib=0.125
    )
    generators = start_generators(str(model_dir), config, seed=0)
    state_dict = AutoModelForCausalLM.from_pretrained(str(model_dir)).state_dict()
    sync(generators, state_dict, 1)  # warm-up
    times: dict[int, list[tuple[float, float]]] = {n: [] for n in COUNTS}
    version = 1
    for _ in range(args.runs):
        for n in COUNTS:
            version += 1
            times[n].append(sync(generators[:n], perturbed(state_dict, version), version))
    nbytes = pack_state_dict(state_dict, 0).nbytes
    print(f"\n{args.engine} weight sync, {nbytes / 2**20:.1f} MiB packed, median of {args.runs}")
    print(f"{'generators':<12}{'pack+put ms':>12}{'load ms':>10}{'total ms':>10}{'ratio':>8}")
    totals = {n: median_ms([put + load for put, load in times[n]]) for n in COUNTS}
    for n in COUNTS:
        put = median_ms([p for p, _ in times[n]])
        load = median_ms([x for _, x in times[n]])
        ratio = totals[n] / totals[COUNTS[0]]
        print(f"{n:<12}{put:>12.1f}{load:>10.1f}{totals[n]:>10.1f}{ratio:>7.2f}x")
    for generator in generators:
        ray.kill(generator)


def bench_transfer(model_dir: Path, runs: int) -> None:
    from transformers import AutoModelForCausalLM

    state_dict = AutoModelForCausalLM.from_pretrained(str(model_dir)).state_dict()
    formats = {"packed buffer": pack_state_dict(state_dict, 0), "torch state dict": state_dict}
    readers = [Reader.remote() for _ in range(max(COUNTS))]
    transfer_seconds(readers, formats["packed buffer"])  # warm-up
    times = {(f, n): [] for f in formats for n in COUNTS}
    for _ in range(runs):
        for (name, n), values in times.items():
            values.append(transfer_seconds(readers[:n], formats[name]))
    print(f"\ntransfer only (put + N readers get and sum), median of {runs}")
    print(
        f"{'format':<18}" + "".join(f"{f'{n} reader(s) ms':>16}" for n in COUNTS) + f"{'ratio':>8}"
    )
    for name in formats:
        medians = [median_ms(times[(name, n)]) for n in COUNTS]
        cells = "".join(f"{m:>16.1f}" for m in medians)
        print(f"{name:<18}{cells}{medians[-1] / medians[0]:>7.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--engine", choices=["vllm", "hf"], default="vllm")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-weight-sync-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    os.environ["TMPDIR"] = str(work)
    model_dir = build_tiny_model(work / "model", n_embd=args.n_embd, n_layer=args.n_layer, n_head=4)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        bench_syncs(model_dir, args)
        bench_transfer(model_dir, args.runs)
    finally:
        ray.shutdown()
    print(
        f"(model: GPT-2 width {args.n_embd}, {args.n_layer} layers; {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f})"
    )


if __name__ == "__main__":
    main()
