"""Weight sync, object store vs collective (gloo on CPU), to 1 and 3 generators, side by side.

One sync is what the job does after a step (``job/sync.py``'s ``WeightSync.publish``):
the learner publishes its policy and every generator loads it in place and answers the version it
holds. The object store: pack, one ``ray.put``, then every generator reads the one copy. The
collective: the learner broadcasts bucket by bucket (``bucket_mb``) over a gloo group while every
generator receives. Times run from the publish call until the last generator holds the version;
GB/s is the model's bytes over that time (each generator gets all of them). Each transport
has its own learner and 3 generators (a generator's receiver is fixed when it starts); the
1-generator syncs use the first of them.
Targets: collective <= 1.2x the object store; 3 generators <= 1.3x of 1.

    .venv/bin/python bench/weight_sync.py [--sizes 13,100,500] [--runs 3] [--engine hf|vllm]
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

from rlfleet.actors.generator import RemoteGenerator, generator_options  # noqa: E402
from rlfleet.common.config import GeneratorConfig, MetricsConfig, WeightSyncConfig  # noqa: E402
from rlfleet.common.transport import make_publisher  # noqa: E402
from rlfleet.job.pool import ActorPool  # noqa: E402
from rlfleet.job.sync import WeightSync  # noqa: E402
from rlfleet.learner.rank_group import LearnerGroup  # noqa: E402
from rlfleet.tasks.tiny_model import build_tiny_model  # noqa: E402

COUNTS = (1, 3)
TRANSPORTS = ("object_store", "collective")
MODELS = {13: (256, 4, 4), 100: (512, 8, 8), 500: (1024, 10, 16)}
"""About that many MiB of float32 GPT-2: (width, layers, heads), heads of 64."""


@ray.remote(num_cpus=1)
class BenchLearner:
    """The learner's weight methods (learner/actor.py) on a plain model; ``step`` perturbs it."""

    def __init__(self, model_dir: str, weight_sync: WeightSyncConfig) -> None:
        from transformers import AutoModelForCausalLM

        self.policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.version = 0
        self._publisher = make_publisher(weight_sync, dtype="float32")

    def ready(self) -> int:
        return self.version

    @torch.no_grad()
    def step(self) -> int:
        self.version += 1
        for param in self.policy.parameters():
            param.mul_(1.0 + 1e-4)
        return self.version

    def nbytes(self) -> int:
        unique = {p.data_ptr(): p for p in self.policy.state_dict().values()}
        return sum(t.numel() * t.element_size() for t in unique.values())

    def publish_weights(self):
        return self._publisher.publish(iter(self.policy.state_dict().items()), self.version)

    def join_weight_group(self, spec) -> None:
        self._publisher.join(spec)


def start_actors(
    model_dir: Path, weight_sync: WeightSyncConfig, engine: str
) -> tuple[object, list]:
    """A learner and ``max(COUNTS)`` generators receiving through ``weight_sync``."""
    learner = BenchLearner.remote(str(model_dir), weight_sync)
    config = GeneratorConfig(engine=engine, num_cpus=0.5, kv_cache_gib=0.125)
    generators = [
        RemoteGenerator.options(**generator_options(config)).remote(
            i,
            str(model_dir),
            config,
            0,
            metrics=MetricsConfig(enabled=False),
            weight_transport=weight_sync,
        )
        for i in range(max(COUNTS))
    ]
    ray.get([learner.ready.remote(), *[g.ready.remote() for g in generators]])
    return learner, generators


def sync_seconds(
    learner, generators: list, weight_sync: WeightSyncConfig, runs: int
) -> list[float]:
    """``runs`` timed syncs to ``generators`` (after a warm-up that forms the group)."""
    sync = WeightSync(LearnerGroup([learner], timeout_s=600), weight_sync, backend="gloo")
    pool = ActorPool("generator", lambda i: generators[i], len(generators))
    seconds = []
    for _ in range(runs + 1):
        ray.get(learner.step.remote())
        started = time.perf_counter()
        sync.publish(pool)
        seconds.append(time.perf_counter() - started)
    return seconds[1:]


def bench_model(size_mib: int, work: Path, args: argparse.Namespace) -> None:
    width, layers, heads = MODELS[size_mib]
    model_dir = build_tiny_model(
        work / f"model-{size_mib}", n_embd=width, n_layer=layers, n_head=heads
    )
    medians: dict[tuple[str, int], float] = {}
    for transport in TRANSPORTS:
        weight_sync = WeightSyncConfig(transport=transport, bucket_mb=args.bucket_mb, timeout_s=600)
        learner, generators = start_actors(model_dir, weight_sync, args.engine)
        nbytes = ray.get(learner.nbytes.remote())
        for n in COUNTS:
            seconds = sync_seconds(learner, generators[:n], weight_sync, args.runs)
            medians[transport, n] = statistics.median(seconds)
        for actor in [learner, *generators]:
            ray.kill(actor)
    print(
        f"\n{nbytes / 2**20:.0f} MiB (GPT-2 width {width}, {layers} layers), {args.engine} "
        f"engine, bucket_mb {args.bucket_mb:g}, median of {args.runs}"
    )
    header = "".join(f"{t + ' s':>16}{'GB/s':>7}" for t in TRANSPORTS)
    print(f"{'generators':<11}{header}{'coll/os':>9}")
    for n in COUNTS:
        cells = "".join(
            f"{medians[t, n]:>16.3f}{nbytes / medians[t, n] / 1e9:>7.2f}" for t in TRANSPORTS
        )
        ratio = medians["collective", n] / medians["object_store", n]
        print(f"{n:<11}{cells}{ratio:>8.2f}x")
    scaling = "  ".join(f"{t}: {medians[t, 3] / medians[t, 1]:.2f}x" for t in TRANSPORTS)
    print(f"3 generators / 1: {scaling}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="13,100,500", help="model sizes in MiB: 13, 100, 500")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--engine", choices=["vllm", "hf"], default="hf")
    parser.add_argument("--bucket-mb", type=float, default=64.0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-weight-sync-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    os.environ["TMPDIR"] = str(work)
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            bench_model(size, work, args)
    finally:
        ray.shutdown()
    print(
        f"({os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; other processes "
        "may share the machine)"
    )


if __name__ == "__main__":
    main()
