"""Agent workflows through the generator's OpenAI-compatible endpoint vs the native multi-turn
loop: sampled tokens/s of the same guess-the-number games, side by side in one run.

One process, one local Ray instance, two ``GeneratorActor`` s (in this process, each with its
own vLLM engine, the same ``GeneratorConfig``, the same job seed) and ``--env-actors``
environment actors per side (1, as examples/agent_guess.yaml):

- ``native``: ``env.environment: rlfleet.tasks.guess:GuessEnv`` (kwargs ``max_number`` 16,
  ``max_turns`` 16, ``turn_cost`` 0.05: the agent's game), stepped by the generator's
  multi-turn loop (actors/rollout.py ``MultiTurnRollout``).
- ``endpoint``: ``env.agent: rlfleet.tasks.openai_agents:guess``, the same game written with the
  ``openai`` package alone: each trajectory's agent runs in an environment actor and calls the
  generator's endpoint over HTTP (actors/endpoint.py, actors/agent_rollout.py).

Both play the same batch (the same rows and rollout ids, so the same sampling seeds) with at
most 4 tokens a turn and the same token budgets, the sides alternating over ``--rounds`` rounds
after one untimed warm-up each (bench/side_by_side.py ``alternate``). Tokens/s is tokens
actually sampled (loss mask 1) over the wall time of the generator's ``generate`` call; the
ratios are medians over the rounds of endpoint / native. The target (issue): endpoint tokens/s
>= 0.7x native. ``cpu_s`` is the CPU time of this process (the generators: engine, loop and the
endpoint's server thread) and of the side's environment actors (the agents and their clients)
during the call: on a small machine it shows which process bounds a side.

The two games pick their secrets differently (``GuessEnv`` from the trajectory's seed, the agent
from ``row["game"]``). Here each row also carries ``secret``, the agent's secret for its game,
which ``GuessEnv`` takes instead, so both sides play the same secrets. A turn (a call) is seeded
alike on both sides too, so a well-trained model plays the same games on both; they may still
part (``GuessEnv`` reads a reply's first number, the agent its last; a game too long for the
token budget ends as ``length`` natively while the agent's next call is refused: the trajectory
fails, counted as ``dropped``, and its sampled tokens are not counted). The figure is
throughput either way; ``mean_turns`` shows how much each side played.

The model is ``--model`` (default artifacts/guess-model: ``rlfleet tiny-model
artifacts/guess-model --task guess``); where it is absent, one is pretrained for the run in a
temporary directory (``--pretrain-steps``; 40 with ``--quick``).

    .venv/bin/python bench/agent_endpoint.py [--trajectories 64] [--rounds 3] [--env-actors 1]
        [--quick] [--model DIR] [--pretrain-steps N] [--json PATH]
"""

from __future__ import annotations

import os

os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # before torch is imported: idle threads sleep
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import psutil  # noqa: E402
import ray  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # side_by_side, when imported
from side_by_side import alternate, machine, median_ratio  # noqa: E402

from rlfleet.common.env_config import EnvConfig  # noqa: E402
from rlfleet.tasks import guess as guess_task  # noqa: E402
from rlfleet.tasks import openai_agents  # noqa: E402
from rlfleet.tasks.tiny_model import GUESS_SHAPE, pretrain_guess_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "artifacts" / "guess-model"
ENVIRONMENT = "rlfleet.tasks.guess:GuessEnv"
AGENT = "rlfleet.tasks.openai_agents:guess"
GAME = {
    "max_number": openai_agents.GUESS_MAX,
    "max_turns": openai_agents.GUESS_TURNS,
    "turn_cost": openai_agents.GUESS_TURN_COST,
}
"""``GuessEnv``'s kwargs: the openai agent's game."""
TOKENS_PER_TURN = 4
MAX_TOTAL_TOKENS = 224
"""As examples/agent_guess.yaml: 16 turns of a few tokens with their hints."""
SIDES = ("native", "endpoint")
TARGET = 0.7
SIZES = {"trajectories": 64, "rounds": 3, "pretrain_steps": GUESS_SHAPE.steps}
QUICK = {"trajectories": 8, "rounds": 1, "pretrain_steps": 40}
"""The sizes not given on the command line, in a normal run and with ``--quick``."""
FIGURES = ("tokens_per_s", "trajectories_per_s", "mean_turns")
FAILED = ("agent_", "env_")
"""Finish reasons of trajectories that failed (actors/agent_rollout.py ``DROPPED``, an
environment's error or timeout)."""


def env_config(side: str, env_actors: int = 1) -> EnvConfig:
    """The ``env:`` section of one side: the same budgets and actors for both."""
    source = {"environment": ENVIRONMENT, "kwargs": GAME} if side == "native" else {"agent": AGENT}
    return EnvConfig(
        **source,
        num_actors=env_actors,
        max_turns=GAME["max_turns"],
        max_total_tokens=MAX_TOTAL_TOKENS,
        max_tokens_per_turn=TOKENS_PER_TURN,
        trajectory_timeout_s=300,
    )


def rows(n: int) -> list[dict[str, Any]]:
    """The games: the prompt file's rows (``game`` i), each with the agent's secret for it."""
    return [
        {
            "messages": guess_task.intro(GAME["max_number"]),
            "game": i,
            "secret": random.Random(i).randint(1, openai_agents.GUESS_MAX),
        }
        for i in range(n)
    ]


@dataclass
class Side:
    """One side's generator and environment actors."""

    generator: Any
    """The ``GeneratorActor`` (None until it has started)."""
    envs: list[Any]
    env_processes: list[Any]
    """The environment actors' processes (psutil), for their CPU seconds."""


class Bench:
    """Both sides, started in one Ray instance, and the batch they play."""

    def __init__(self, model_dir: Path, trajectories: int, env_actors: int) -> None:
        from transformers import AutoTokenizer

        from rlfleet.actors.generator import GeneratorActor
        from rlfleet.actors.trajectories import EnvSetup
        from rlfleet.common.config import GeneratorConfig, MetricsConfig
        from rlfleet.common.schema import prompt_batch
        from rlfleet.envs.actor import EnvActor, env_actor_options

        self.config = GeneratorConfig(
            max_new_tokens=TOKENS_PER_TURN, temperature=1.0, kv_cache_gib=0.25
        )
        self.sides: dict[str, Side] = {}
        for name in SIDES:
            config = env_config(name, env_actors)
            remote = ray.remote(EnvActor).options(**env_actor_options(config))
            envs = [remote.remote(i, config) for i in range(config.num_actors)]
            self.sides[name] = side = Side(None, envs, [])  # kept: shutdown stops them
            pids = ray.get([actor.pid.remote() for actor in envs])
            side.env_processes = [psutil.Process(pid) for pid in pids]
            side.generator = GeneratorActor(
                0,
                str(model_dir),
                self.config,
                0,
                metrics=MetricsConfig(enabled=False),
                env=EnvSetup(config, envs),
            )
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        games = rows(trajectories)
        ids = [
            tokenizer.apply_chat_template(
                r["messages"], add_generation_prompt=True, tokenize=True, return_dict=False
            )
            for r in games
        ]
        texts = [r["messages"][0]["content"] for r in games]
        self.batch = prompt_batch(list(range(trajectories)), texts, ids, metadata=games)

    def run(self, name: str) -> dict[str, Any]:
        """The batch on one side: sampled tokens, wall seconds, the rates, the games' turns."""
        side = self.sides[name]
        env_cpu = _cpu_seconds(side.env_processes)
        cpu, start = time.process_time(), time.perf_counter()
        out = side.generator.generate(self.batch).to_pydict()
        wall = time.perf_counter() - start
        cpu = time.process_time() - cpu
        env_cpu = _cpu_seconds(side.env_processes) - env_cpu
        infos = [json.loads(info or "{}") for info in out["env_info"]]
        reasons = Counter(out["finish_reason"])
        n = len(out["loss_mask"])
        dropped = sum(count for r, count in reasons.items() if r.startswith(FAILED))
        errors = sorted({info["error"] for info in infos if info.get("error")})
        if dropped == n:
            raise RuntimeError(f"{name}: every trajectory failed: {dict(reasons)}; {errors[:3]}")
        tokens = sum(sum(mask) for mask in out["loss_mask"])
        return {
            "tokens": tokens,
            "wall_s": round(wall, 4),
            "tokens_per_s": round(tokens / wall, 1),
            "trajectories_per_s": round(n / wall, 3),
            "mean_turns": round(statistics.mean(out["num_turns"]), 3),
            "solved": round(sum(bool(i.get("solved")) for i in infos) / n, 3),
            "finish_reasons": dict(sorted(reasons.items())),
            "dropped": dropped,
            "errors": errors[:3],
            "split_calls": sum(int(i.get("split_calls", 0)) for i in infos),
            "cpu_s": {"generator": round(cpu, 3), "env_actors": round(env_cpu, 3)},
        }

    def shutdown(self) -> None:
        """Stops the endpoints' servers and the environment actors."""
        for side in self.sides.values():
            endpoint = getattr(side.generator, "_endpoint", None)
            if endpoint is not None:
                endpoint.stop()
            for actor in side.envs:
                ray.kill(actor, no_restart=True)


def _cpu_seconds(processes: list[Any]) -> float:
    """User and system CPU seconds of ``processes`` so far."""
    return sum(sum(p.cpu_times()[:2]) for p in processes)


def model_dir(args: argparse.Namespace, work: Path) -> tuple[Path, str]:
    """The model, and where it came from: ``--model``, else pretrained here."""
    if (args.model / "model.safetensors").exists():
        return args.model, str(args.model)
    print(f"{args.model} is absent: pretraining a guess model ({args.pretrain_steps} steps)")
    built = pretrain_guess_model(work / "guess-model", steps=args.pretrain_steps)
    return built, f"pretrained here, {args.pretrain_steps} steps"


def build_report(
    args: argparse.Namespace,
    model: str,
    results: dict[str, list[dict[str, Any]]],
    load: dict[str, list[float]],
) -> dict[str, Any]:
    import torch

    ratios = {
        figure: round(median_ratio(results["endpoint"], results["native"], figure), 3)
        for figure in ("tokens_per_s", "trajectories_per_s")
    }
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
            "model": model,
            "trajectories": args.trajectories,
            "rounds": args.rounds,
            "env_actors": args.env_actors,
            "max_tokens_per_turn": TOKENS_PER_TURN,
            "max_total_tokens": MAX_TOTAL_TOKENS,
            "game": GAME,
            "native": ENVIRONMENT,
            "endpoint": AGENT,
            "secrets": "GuessEnv picks from the seed, the agent from row['game']: each row "
            "carries the agent's secret as 'secret', which GuessEnv takes, so both sides play "
            "the same secrets (the figure is throughput either way)",
        },
        "sides": {
            name: {
                **{
                    figure: statistics.median(r[figure] for r in results[name])
                    for figure in FIGURES
                },
                "rounds": results[name],
            }
            for name in SIDES
        },
        "ratios": {f"endpoint/native {figure}": value for figure, value in ratios.items()},
        "target": {"ratio": "endpoint/native tokens_per_s", "at_least": TARGET},
        "target_met": ratios["tokens_per_s"] >= TARGET,
    }


def print_summary(report: dict[str, Any]) -> None:
    workload = report["workload"]
    print(
        f"\n{workload['trajectories']} guess games (1..{workload['game']['max_number']}, <= "
        f"{workload['game']['max_turns']} turns of <= {workload['max_tokens_per_turn']} tokens), "
        f"model {workload['model']}, median of {workload['rounds']} rounds"
    )
    load = report["load_average"]
    print(f"{report['machine']}; load average at start {load['start']}, at end {load['end']}")
    print("secrets: the same on both sides (each row's 'secret' is the agent's for its game)")
    print(
        f"{'side':<10}{'tokens':>8}{'wall s':>8}{'tokens/s':>10}{'traj/s':>8}{'turns':>7}"
        f"{'gen cpu s':>11}{'env cpu s':>11}"
    )
    for name, side in report["sides"].items():
        rounds = side["rounds"]
        wall, gen_cpu, env_cpu = (
            statistics.median(figure(r) for r in rounds)
            for figure in (
                lambda r: r["wall_s"],
                lambda r: r["cpu_s"]["generator"],
                lambda r: r["cpu_s"]["env_actors"],
            )
        )
        print(
            f"{name:<10}{rounds[0]['tokens']:>8}{wall:>8.2f}{side['tokens_per_s']:>10.1f}"
            f"{side['trajectories_per_s']:>8.2f}{side['mean_turns']:>7.2f}"
            f"{gen_cpu:>11.2f}{env_cpu:>11.2f}"
        )
    for pair, value in report["ratios"].items():
        print(f"{pair:<40}{value:>6.2f}x")
    target = report["target"]
    verdict = "met" if report["target_met"] else "NOT met"
    print(f"target {target['ratio']} >= {target['at_least']}: {verdict}")


def round_row(round_index: int, name: str, result: dict[str, Any]) -> str:
    row = (
        f"round {round_index} {name:<9}{result['tokens']:>6} tokens {result['wall_s']:>7.2f} s "
        f"{result['tokens_per_s']:>7.1f} tokens/s {result['trajectories_per_s']:>6.2f} traj/s "
        f"{result['mean_turns']:>5.2f} turns, solved {result['solved']:.0%}"
    )
    if result["dropped"]:
        row += f", {result['dropped']} failed: {(result['errors'] or ['?'])[0]}"
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trajectories", type=int, help=f"{SIZES['trajectories']}")
    parser.add_argument("--rounds", type=int, help=f"{SIZES['rounds']}")
    parser.add_argument("--env-actors", type=int, default=1, help="per side (env.num_actors)")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument(
        "--pretrain-steps", type=int, help=f"when the model is absent ({SIZES['pretrain_steps']})"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a smoke test: {QUICK['trajectories']} trajectories, {QUICK['rounds']} round, "
        f"{QUICK['pretrain_steps']} pretraining steps if the model is absent",
    )
    parser.add_argument("--json", type=Path, help="write the report here too")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else SIZES).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if min(args.trajectories, args.rounds, args.pretrain_steps, args.env_actors) < 1:
        parser.error("--trajectories, --rounds, --env-actors, --pretrain-steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from rlfleet.job.cluster import use_loopback_only

    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-agent-endpoint-"))
    load = {"start": [round(x, 2) for x in os.getloadavg()]}
    bench = None
    try:
        model, source = model_dir(args, work)
        use_loopback_only()
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
        bench = Bench(model, args.trajectories, args.env_actors)
        for name in SIDES:  # warm-up, untimed
            bench.run(name)
        results = alternate(SIDES, args.rounds, bench.run, round_row)
    finally:
        if bench is not None:
            bench.shutdown()
        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
    load["end"] = [round(x, 2) for x in os.getloadavg()]
    report = build_report(args, source, results, load)
    print_summary(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
