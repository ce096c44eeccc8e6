"""Multi-turn rollout throughput against slow environments: rlfleet's loop vs a turn-synchronous
one.

``N`` trajectories of exactly ``--turns`` turns, each turn sampling up to ``--tokens`` tokens,
each environment step sleeping (a blocking sleep in the environment actor's worker thread,
bench/multiturn_env.py). Modes, all in one run on the same in-process vLLM engine and the same
two environment actors, alternating over rounds (bench/side_by_side.py ``alternate``):

- ``async_0ms``: rlfleet's loop (actors/rollout.py ``MultiTurnRollout``), environments that do
  not sleep: the engine-bound ceiling.
- ``async_100ms`` / ``sync_100ms``: every step sleeps ``--sleep-ms``, with rlfleet's loop and
  with the turn-synchronous loop (``turn_synchronous``: each turn one ``engine.generate`` over
  every trajectory, then every step, waiting for the slowest, as a batch-per-turn loop does).
- ``async_varied`` / ``sync_varied``: each step sleeps a seeded draw from ``--sleep-ms`` +-
  ``--spread-ms`` (the same draws in both), where waiting for the slowest costs more.

Tokens/s is tokens actually sampled (loss-mask 1) / wall time of the whole batch. Both loops
seed a turn with ``turn_seed(rollout seed, turn)``, so they sample the same tokens. The target
(issue): ``async_100ms`` >= 0.8x ``async_0ms``. ``engine_s`` is the time spent inside the
engine's calls, so ``engine_s / wall_s`` shows how long it sat idle; ``no_overlap_bound`` is
``async_0ms``'s figure with every turn's sleep added to its wall time: what a loop that overlaps
nothing reaches, and all any loop can reach when every trajectory sleeps at once (uniform sleeps,
equal turn lengths: nothing is left for the engine to do meanwhile).

The loop runs in this process (as in a generator actor, without the actor's call): the model is
a random-weight GPT-2 (``--layers`` x ``--width``, default 4 x 256, head size 64), big enough
that a decoding step of 64 sequences costs about 15 ms on a 2-core CPU, so a 32-token turn
(about 0.5 s) is a few env steps long, not far under one.

    .venv/bin/python bench/multiturn.py [--trajectories 64] [--tokens 32] [--rounds 3]
        [--sleep-ms 100] [--spread-ms 50] [--json PATH]
"""

from __future__ import annotations

import os

os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # before torch is imported: idle threads sleep
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import atexit  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, replace  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import ray  # noqa: E402
from side_by_side import alternate, machine, median_ratio  # noqa: E402

from rlfleet.actors.engine import Completion, SamplingSpec  # noqa: E402
from rlfleet.actors.generator import rollout_seed  # noqa: E402
from rlfleet.actors.rollout import MultiTurnRollout, Trajectory, turn_seed  # noqa: E402
from rlfleet.actors.turns import TurnTokens  # noqa: E402
from rlfleet.common.env_config import EnvConfig  # noqa: E402
from rlfleet.envs.actor import EnvActor, env_actor_options  # noqa: E402

ENVIRONMENT = "rlfleet.bench.multiturn_env:SleepingEnv"
OBSERVATION_ROOM = 16
"""Tokens kept per turn for the observation (`` then 3 more``: a handful)."""
TARGET = 0.8


@dataclass(frozen=True)
class Mode:
    """One side of the benchmark: which loop, and each step's sleep range in seconds."""

    loop: str
    sleep_s: tuple[float, float]


class TimedEngine:
    """The engine's request and batch API, summing the seconds spent inside its calls."""

    def __init__(self, engine: Any) -> None:
        self.engine, self.seconds = engine, 0.0

    @property
    def context(self) -> int:
        return self.engine.context

    def submit(self, key: str, prompt_ids: list[int], params: SamplingSpec) -> None:
        self.engine.submit(key, prompt_ids, params)

    def busy(self) -> bool:
        return self.engine.busy()

    def poll(self) -> list[tuple[str, Completion]]:
        return self._timed(self.engine.poll)

    def generate(self, prompt_ids: list[list[int]], params: SamplingSpec) -> list[Completion]:
        return self._timed(self.engine.generate, prompt_ids, params)

    def _timed(self, call: Any, *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return call(*args)
        finally:
            self.seconds += time.perf_counter() - start


def modes(sleep_ms: float, spread_ms: float) -> dict[str, Mode]:
    """The benchmark's sides (the varied pair only with a spread)."""
    sleep, spread = sleep_ms / 1000, spread_ms / 1000
    sides = {
        "async_0ms": Mode("async", (0.0, 0.0)),
        f"async_{sleep_ms:g}ms": Mode("async", (sleep, sleep)),
        f"sync_{sleep_ms:g}ms": Mode("sync", (sleep, sleep)),
    }
    if spread > 0:
        sides["async_varied"] = Mode("async", (max(sleep - spread, 0.0), sleep + spread))
        sides["sync_varied"] = Mode("sync", (max(sleep - spread, 0.0), sleep + spread))
    return sides


def trajectories(
    prompts: list[list[int]], mode: Mode, turns: int, seed: int = 0
) -> list[Trajectory]:
    """Fresh trajectories, one per prompt, with the mode's sleep range in their rows."""
    row = {"turns": turns, "sleep_s": list(mode.sleep_s)}
    return [
        Trajectory(rid, rollout_seed(seed, rid), dict(row), ids) for rid, ids in enumerate(prompts)
    ]


def turn_synchronous(
    engine: TimedEngine,
    turns: TurnTokens,
    envs: list[Any],
    batch: list[Trajectory],
    sampling: SamplingSpec,
) -> None:
    """The comparison loop (not product code): every turn, one ``generate`` over every live
    trajectory (seeded as rlfleet's loop seeds it), then every trajectory's step, waiting for
    all of them before the next turn."""

    def env_of(trajectory: Trajectory) -> Any:
        return envs[trajectory.rollout_id % len(envs)]

    _check(ray.get([env_of(t).reset.remote(t.rollout_id, t.row, t.seed) for t in batch]))
    for trajectory in batch:
        trajectory.prompt_ids = list(trajectory.dataset_prompt_ids)
    live = batch
    while live:
        params = replace(sampling, seeds=tuple(turn_seed(t.seed, t.turns) for t in live))
        completions = engine.generate([t.prompt_ids + t.response_ids for t in live], params)
        steps = []
        for trajectory, completion in zip(live, completions, strict=True):
            trajectory.append(list(completion.token_ids), list(completion.logprobs))
            trajectory.turn_ends.append(len(trajectory.response_ids) - 1)
            action = turns.decode(list(completion.token_ids))
            step = env_of(trajectory).step.remote(trajectory.rollout_id, trajectory.turns, action)
            steps.append(step)
        replies = _check(ray.get(steps))
        live = [t for t, reply in zip(live, replies, strict=True) if _go_on(turns, t, reply)]


def _go_on(turns: TurnTokens, trajectory: Trajectory, reply: Any) -> bool:
    """Appends the observation (as rlfleet's loop does); False when the environment is done."""
    if reply.done:
        trajectory.finish_reason = "stop"
        return False
    ids = turns.closing_ids(trajectory.response_ids) + turns.observation_ids(reply.observation)
    trajectory.append(ids)
    return True


def _check(replies: list[Any]) -> list[Any]:
    """The replies; raises on an environment's error (a broken benchmark reports nothing)."""
    for reply in replies:
        if reply.error or reply.timed_out:
            raise RuntimeError(f"environment failed: {reply.error or 'timed out'}")
    return replies


def env_config(turns: int, tokens: int) -> EnvConfig:
    """The ``env:`` section both loops run under: budgets that never end a trajectory early."""
    return EnvConfig(
        environment=ENVIRONMENT,
        max_turns=turns,
        max_tokens_per_turn=tokens,
        max_total_tokens=turns * (tokens + OBSERVATION_ROOM),
    )


@dataclass
class Bench:
    """What every mode shares: the engine, the environment actors, the prompts, the sizes."""

    engine: TimedEngine
    turns: TurnTokens
    envs: list[Any]
    prompts: list[list[int]]
    n_turns: int
    tokens: int

    def config(self) -> EnvConfig:
        return env_config(self.n_turns, self.tokens)

    def run(self, mode: Mode) -> dict[str, Any]:
        """One batch in ``mode``: its sampled tokens, wall and engine seconds, tokens/s."""
        batch = trajectories(self.prompts, mode, self.n_turns)
        sampling = SamplingSpec(max_new_tokens=self.tokens)
        engine_before = self.engine.seconds
        start = time.perf_counter()
        if mode.loop == "async":
            loop = MultiTurnRollout(
                self.engine, self.turns, self.envs, self.config(), sampling, self.engine.context
            )
            loop.run(batch)
        else:
            turn_synchronous(self.engine, self.turns, self.envs, batch, sampling)
        wall = time.perf_counter() - start
        _check_finished(batch, self.n_turns)
        tokens = sum(sum(t.loss_mask) for t in batch)
        return {
            "tokens": tokens,
            "wall_s": round(wall, 4),
            "engine_s": round(self.engine.seconds - engine_before, 4),
            "tokens_per_s": round(tokens / wall, 1),
        }


def _check_finished(batch: list[Trajectory], n_turns: int) -> None:
    """Every trajectory ran its turns to the environment's end (else the figures mean less)."""
    wrong = [t.rollout_id for t in batch if t.finish_reason != "stop" or t.turns != n_turns]
    if wrong:
        raise RuntimeError(f"trajectories {wrong[:8]} did not run {n_turns} turns to the end")


def start(args: argparse.Namespace, work: Path) -> Bench:
    """The model, its engine (in this process) and the environment actors."""
    from transformers import AutoTokenizer

    from rlfleet.actors.vllm_engine import VLLMEngine
    from rlfleet.common.config import GeneratorConfig
    from rlfleet.job.cluster import use_loopback_only
    from rlfleet.tasks.tiny_model import build_tiny_model

    model_dir = build_tiny_model(
        work / "model",
        n_layer=args.layers,
        n_embd=args.width,
        n_head=args.width // 64,
        n_positions=512,
    )
    engine = VLLMEngine(
        model_dir, GeneratorConfig(max_new_tokens=args.tokens, kv_cache_gib=0.25), 0
    )
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    texts = [f"review {i}: the film was" for i in range(args.trajectories)]
    use_loopback_only()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    config = env_config(args.turns, args.tokens)
    remote = ray.remote(EnvActor).options(**env_actor_options(config))
    envs = [remote.remote(i, config) for i in range(args.env_actors)]
    ray.get([actor.ready.remote() for actor in envs])
    prompts = tokenizer(texts).input_ids
    return Bench(TimedEngine(engine), TurnTokens(tokenizer), envs, prompts, args.turns, args.tokens)


def ratios(results: dict[str, list[dict[str, Any]]], sleep_name: str) -> dict[str, float]:
    """Median-over-rounds tokens/s ratios: against the 0 ms ceiling and against the
    turn-synchronous loop with the same sleeps."""
    pairs = [(sleep_name, "async_0ms"), (sleep_name, sleep_name.replace("async", "sync"))]
    if "async_varied" in results:
        pairs += [("async_varied", "async_0ms"), ("async_varied", "sync_varied")]
    pairs.append((sleep_name.replace("async", "sync"), "async_0ms"))
    return {
        f"{a}/{b}": round(median_ratio(results[a], results[b], "tokens_per_s"), 3) for a, b in pairs
    }


def no_overlap_bound(ceiling: list[dict[str, Any]], turns: int, sleep_s: float) -> float:
    """What ``async_0ms``'s tokens/s would become if every turn's sleep were added to its wall
    time with nothing overlapped (a perfect turn-synchronous loop), as a fraction of it."""
    return round(
        statistics.median(r["wall_s"] / (r["wall_s"] + turns * sleep_s) for r in ceiling), 3
    )


def build_report(
    args: argparse.Namespace,
    sides: dict[str, Mode],
    results: dict[str, list[dict[str, Any]]],
    load: dict[str, list[float]],
) -> dict[str, Any]:
    import torch

    sleep_name = f"async_{args.sleep_ms:g}ms"
    figures = ratios(results, sleep_name)
    target_ratio = figures[f"{sleep_name}/async_0ms"]
    return {
        "machine": machine(),
        "nproc": len(os.sched_getaffinity(0)),
        "load_average": load,
        "threads": {
            "OMP_WAIT_POLICY": os.environ["OMP_WAIT_POLICY"],
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
            "torch": torch.get_num_threads(),
        },
        "workload": {
            "model": f"random GPT-2 {args.layers} x {args.width}, head size 64",
            "trajectories": args.trajectories,
            "turns": args.turns,
            "max_tokens_per_turn": args.tokens,
            "env_actors": args.env_actors,
            "rounds": args.rounds,
        },
        "modes": {
            name: {
                "loop": mode.loop,
                "sleep_ms": [round(1000 * s, 1) for s in mode.sleep_s],
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in results[name]),
                "rounds": results[name],
            }
            for name, mode in sides.items()
        },
        "ratios": figures,
        "no_overlap_bound": no_overlap_bound(
            results["async_0ms"], args.turns, args.sleep_ms / 1000
        ),
        "target": {"ratio": f"{sleep_name}/async_0ms", "at_least": TARGET},
        "target_met": target_ratio >= TARGET,
    }


def print_summary(report: dict[str, Any]) -> None:
    workload = report["workload"]
    print(
        f"\n{workload['trajectories']} trajectories x {workload['turns']} turns x <= "
        f"{workload['max_tokens_per_turn']} tokens, {workload['model']}, "
        f"{workload['env_actors']} env actors, median of {workload['rounds']} rounds"
    )
    print(f"{report['machine']}; load average at start {report['load_average']['start']}")
    print(f"{'mode':<16}{'sleep ms':>12}{'tokens':>8}{'wall s':>8}{'engine':>8}{'tokens/s':>10}")
    for name, mode in report["modes"].items():
        rounds = mode["rounds"]
        wall = statistics.median(r["wall_s"] for r in rounds)
        busy = statistics.median(r["engine_s"] / r["wall_s"] for r in rounds)
        sleep = "-".join(f"{s:g}" for s in dict.fromkeys(mode["sleep_ms"]))
        print(
            f"{name:<16}{sleep:>12}{rounds[0]['tokens']:>8}{wall:>8.2f}{busy:>8.0%}"
            f"{mode['tokens_per_s']:>10.0f}"
        )
    for pair, value in report["ratios"].items():
        print(f"{pair:<32}{value:>6.2f}x")
    print(f"{'no-overlap bound':<32}{report['no_overlap_bound']:>6.2f}x")
    target = report["target"]
    verdict = "met" if report["target_met"] else "NOT met"
    print(f"target {target['ratio']} >= {target['at_least']}: {verdict}")


def round_row(round_index: int, name: str, result: dict[str, Any]) -> str:
    return (
        f"round {round_index} {name:<16}{result['tokens']:>7} tokens {result['wall_s']:>7.2f} s "
        f"{result['tokens_per_s']:>8.0f} tokens/s, engine busy "
        f"{result['engine_s'] / result['wall_s']:.0%}"
    )


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trajectories", type=int, default=64)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32, help="max tokens sampled per turn")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sleep-ms", type=float, default=100.0)
    parser.add_argument(
        "--spread-ms", type=float, default=50.0, help="varied modes: sleep +- spread (0: none)"
    )
    parser.add_argument("--env-actors", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256, help="a multiple of 64")
    parser.add_argument("--json", type=Path, help="write the report here too")
    args = parser.parse_args()
    if args.sleep_ms <= 0 or args.width % 64:
        parser.error("--sleep-ms must be above 0 and --width a multiple of 64")
    return args


def main() -> None:
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-multiturn-"))
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    load = {"start": [round(x, 2) for x in os.getloadavg()]}
    sides = modes(args.sleep_ms, args.spread_ms)
    bench = start(args, work)
    try:
        for loop in ("async", "sync"):  # warm-up, untimed
            bench.run(Mode(loop, (0.0, 0.0)))
        results = alternate(sides, args.rounds, lambda name: bench.run(sides[name]), round_row)
    finally:
        ray.shutdown()
    load["end"] = [round(x, 2) for x in os.getloadavg()]
    report = build_report(args, sides, results, load)
    print_summary(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
