"""The CPU pipeline: rlfleet's synchronous and asynchronous jobs against TRL v0.11.4's generate /
score / step loop, on the same workload in one run.

Workload (issue 10): a GPT-2 of 4 layers x 256 (4 heads) with the tiny model's byte-level BPE
tokenizer (702 tokens), random weights built locally; each iteration 64 prompts of 10 tokens
(the first 10 tokens of the built-in review sentences), 24 new tokens sampled at temperature 1
(no top-k, no top-p), a reward function both sides call (``reward`` below), then a PPO step with
mini-batches of 16 and 2 PPO epochs (the other PPO settings are both trainers' defaults).

Sides (``--sides``, each in its own process, one after the other, the order reversed every
other round):

- ``rlfleet``: ``run_job`` on a local Ray instance with one vLLM generator and one reward actor,
  ``mode: sync``.
- ``rlfleet-async``: the same job with ``mode: async`` and ``max_policy_lag`` ``--lag`` (1): the
  generator samples the next batch while the learner trains, and loads each new policy
  mid-request.
- ``trl``: ``PPOTrainer.generate`` on the 64 prompts at once (the sampling settings above), the
  reward, ``PPOTrainer.step``; in ``.venv-trl`` (``bash bench/setup_trl_venv.sh``), in float32.

Cores and threads (``--cpus`` N, 1 by default): both rlfleet sides run with ``placement:
disaggregated``, ``generators.num_cpus`` N and ``learner.num_cpus`` N, so that generation and
training have cores of their own (the reward actor, a vowel count, reserves none:
``reward.num_cpus`` 0). Each has N threads: the learner's ranks call
``torch.set_num_threads(learner.num_cpus)`` (learner/actor.py ``torch_threads``); the generator's
vLLM engine runs in the actor's own process (tensor_parallel_size 1, so vLLM's OpenMP binding,
``VLLM_CPU_OMP_THREADS_BIND``, which only applies to its worker processes, plays no part) and
keeps torch's threads, which OpenMP takes from ``OMP_NUM_THREADS``: Ray sets it to the actor's
``num_cpus`` unless it is set, and this bench sets it to N in the rlfleet sides' processes
(inherited by every Ray worker). TRL's loop runs generation and training in one process, one
after the other, with 2N threads (``OMP_NUM_THREADS`` and ``torch.set_num_threads``): as many as
the whole rlfleet job. ``--placement colocated`` instead runs the rlfleet sides with the job
config's defaults (the learner's threads take every core while the generator waits).

Reported per side: the median wall time of an iteration after the first (the first pays engine
warm-up), samples/s (64 / that median), the first iteration, the start-up until the first
iteration begins, the whole wall time of the process from its launch to its exit (start-up
included), each part's median, and the load average before and after the side (the machines are
shared). An rlfleet iteration is the time between the scoring of two consecutive batches (the
reward dispatch, right before each learner step), the last one ending when ``run_job`` returns,
the first beginning at the first dispatch of prompts: in async mode the time between two
generator dispatches is no iteration (two batches go out at the start, then one per step); the
time between learner steps is one in both modes.

    .venv/bin/python bench/pipeline.py [--iterations 20] [--rounds 1] [--lag 1] [--cpus 1]
        [--sides rlfleet,rlfleet-async,trl] [--placement disaggregated|colocated]
        [--dtype float32|bfloat16] [--set key=value ...] [--report figures.json]
    .venv/bin/python bench/pipeline.py --impl rlfleet-async --json ...   # one side
    .venv-trl/bin/python bench/pipeline.py --impl trl --json ...

Targets (issue 21): async samples/s at least 1.5x sync's; an async iteration at most 0.7x
TRL's; the async job's whole wall time at most 1.0x TRL's.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VENVS = {
    "rlfleet": ROOT / ".venv" / "bin" / "python",
    "rlfleet-async": ROOT / ".venv" / "bin" / "python",
    "trl": ROOT / ".venv-trl" / "bin" / "python",
}
MODES = {"rlfleet": "sync", "rlfleet-async": "async"}
"""Each rlfleet side's ``mode``."""
N_LAYER, N_EMBD, N_HEAD = 4, 256, 4
PROMPTS_PER_ITERATION, PROMPT_TOKENS, NEW_TOKENS = 64, 10, 24
MINI_BATCH_SIZE, PPO_EPOCHS = 16, 2
SEED = 0
REWARD = "rlfleet.bench.pipeline:reward"
BUSY_LOAD = 1.0
"""A load average above this when the bench starts means other work shares the machine."""
TARGETS = (
    ("async/sync samples/s", "rlfleet-async", "rlfleet", "samples_per_s", ">=", 1.5),
    ("async/TRL iteration", "rlfleet-async", "trl", "iteration_s", "<=", 0.7),
    ("async/TRL whole wall", "rlfleet-async", "trl", "wall_s", "<=", 1.0),
    ("sync/TRL iteration", "rlfleet", "trl", "iteration_s", None, None),
    ("sync/TRL whole wall", "rlfleet", "trl", "wall_s", None, None),
)
"""The ratios reported: name, our side, the other side, the figure (``summary``'s), and the
target (None: for information)."""


def reward(prompts: Sequence[str], responses: Sequence[str], **_: Any) -> list[float]:
    """The share of a response's letters that are vowels: cheap, and something to learn."""

    def vowel_share(text: str) -> float:
        letters = [c for c in text.lower() if c.isalpha()]
        return sum(c in "aeiou" for c in letters) / len(letters) if letters else 0.0

    return [vowel_share(response) for response in responses]


def build_workload(work: Path, iterations: int) -> tuple[Path, Path]:
    """The model directory and a JSONL of ``iterations`` batches of 10-token prompts."""
    from transformers import AutoTokenizer

    from rlfleet.tasks.corpus import review_sentences
    from rlfleet.tasks.tiny_model import build_tiny_model

    model_dir = build_tiny_model(
        work / "model", n_layer=N_LAYER, n_embd=N_EMBD, n_head=N_HEAD, seed=SEED
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = [tokenizer(s).input_ids[:PROMPT_TOKENS] for s in review_sentences()]
    prompts = [tokenizer.decode(i) for i in ids if len(i) == PROMPT_TOKENS]
    needed = iterations * PROMPTS_PER_ITERATION
    if len(prompts) < needed:
        raise SystemExit(
            f"the corpus has {len(prompts)} prompts; {iterations} iterations need more"
        )
    path = work / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts[:needed]))
    return model_dir, path


def read_prompts(path: Path) -> list[str]:
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines()]


def side_threads(impl: str, args: argparse.Namespace) -> int:
    """``OMP_NUM_THREADS`` of a side's process: ``--cpus`` for an rlfleet side (its generator's
    threads), twice that for TRL's loop (the whole rlfleet job's)."""
    return 2 * args.cpus if impl == "trl" else args.cpus


def rlfleet_config(args: argparse.Namespace, work: Path, mode: str = "sync"):
    """The job of an rlfleet side: ``mode`` (``max_policy_lag`` ``--lag`` when async), the
    ``--placement`` and ``--cpus`` settings of the module's docstring, then ``--set``."""
    from rlfleet.common.config import JobConfig
    from rlfleet.common.config_file import apply_overrides

    generators: dict[str, Any] = {"max_new_tokens": NEW_TOKENS, "top_k": 0, "top_p": 1.0}
    learner: dict[str, Any] = {"dtype": args.dtype}
    reward_section: dict[str, Any] = {"function": REWARD}
    if args.placement == "disaggregated":
        generators["num_cpus"] = learner["num_cpus"] = args.cpus
        reward_section["num_cpus"] = 0
    config = {
        "name": "pipeline-bench",
        "model": str(args.model_dir),
        "dataset": {"path": str(args.prompts), "shuffle": False},
        "generators": generators,
        "reward": reward_section,
        "learner": learner,
        "placement": args.placement,
        "mode": mode,
        "max_policy_lag": args.lag if mode == "async" else 0,
        "ppo": {
            "batch_size": PROMPTS_PER_ITERATION,
            "mini_batch_size": MINI_BATCH_SIZE,
            "ppo_epochs": PPO_EPOCHS,
        },
        "iterations": args.iterations,
        "seed": SEED,
        "output_dir": str(work / "rlfleet-run"),
    }
    return JobConfig.model_validate(apply_overrides(config, args.overrides))


def iteration_seconds(
    first_dispatch: float, steps: dict[int, float], finished: float
) -> list[float]:
    """Each iteration's wall time: from one learner step's scoring (``steps[k]``: when
    iteration k's rollouts went to the reward actors) to the next one's; the first from
    ``first_dispatch`` (the first prompts sent to the generators), the last until
    ``finished``."""
    bounds = [first_dispatch, *(steps[k] for k in sorted(steps) if k > 0), finished]
    return [end - start for start, end in pairwise(bounds)]


def run_rlfleet(args: argparse.Namespace, started: float) -> dict[str, Any]:
    """The job on a local Ray instance (see ``iteration_seconds`` for its iterations)."""
    import ray

    from rlfleet.job.cluster import init_ray
    from rlfleet.job.train import run_job

    generator_dispatches: list[float] = []
    steps: dict[int, float] = {}

    def on_dispatch(kind: str, iteration: int, actors: list) -> None:
        now = time.perf_counter()
        if kind == "generator":
            generator_dispatches.append(now)
        elif kind == "reward":
            steps.setdefault(iteration, now)

    mode = MODES[args.impl]
    config = rlfleet_config(args, Path(tempfile.mkdtemp(prefix="bench-pipeline-")), mode)
    init_ray(config)
    try:
        result = run_job(config, on_dispatch=on_dispatch)
        finished = time.perf_counter()
    finally:
        ray.shutdown()
    parts = ("generate", "score", "train", "sync")
    return {
        "iteration_s": iteration_seconds(generator_dispatches[0], steps, finished),
        "startup_s": generator_dispatches[0] - started,
        "parts_s": {p: [s.get(f"time/{p}_s", 0.0) for s in result.stats] for p in parts},
        "reward_mean": [s["reward_mean"] for s in result.stats],
        "settings": {
            "mode": mode,
            "max_policy_lag": config.max_policy_lag,
            "placement": config.placement,
            "generator_num_cpus": config.generators.num_cpus,
            "learner_num_cpus": config.learner.num_cpus,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        },
    }


def run_trl(args: argparse.Namespace, started: float) -> dict[str, Any]:
    """TRL v0.11.4's loop: generate the batch, score it, step."""
    import warnings

    import torch
    from transformers import AutoTokenizer
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    warnings.filterwarnings("ignore")
    torch.set_num_threads(side_threads("trl", args))
    torch.manual_seed(SEED)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    config = PPOConfig(
        batch_size=PROMPTS_PER_ITERATION,
        mini_batch_size=MINI_BATCH_SIZE,
        ppo_epochs=PPO_EPOCHS,
        seed=SEED,
    )
    model = AutoModelForCausalLMWithValueHead.from_pretrained(str(args.model_dir))
    trainer = PPOTrainer(config, model, None, tokenizer)
    generation = {
        "min_length": -1,
        "top_k": 0,
        "top_p": 1.0,
        "do_sample": True,
        "pad_token_id": tokenizer.eos_token_id,
        "max_new_tokens": NEW_TOKENS,
    }
    prompts = read_prompts(args.prompts)
    parts: dict[str, list[float]] = {"generate": [], "score": [], "train": []}
    iteration_s, rewards = [], []
    startup_s = time.perf_counter() - started
    for index in range(args.iterations):
        batch = prompts[index * PROMPTS_PER_ITERATION : (index + 1) * PROMPTS_PER_ITERATION]
        begin = time.perf_counter()
        queries = [torch.tensor(tokenizer(p).input_ids) for p in batch]
        responses = trainer.generate(
            queries, return_prompt=False, batch_size=PROMPTS_PER_ITERATION, **generation
        )
        generated = time.perf_counter()
        scores = reward(batch, tokenizer.batch_decode(responses, skip_special_tokens=True))
        scored = time.perf_counter()
        trainer.step(queries, responses, [torch.tensor(s) for s in scores])
        end = time.perf_counter()
        parts["generate"].append(generated - begin)
        parts["score"].append(scored - generated)
        parts["train"].append(end - scored)
        iteration_s.append(end - begin)
        rewards.append(statistics.mean(scores))
    return {
        "iteration_s": iteration_s,
        "startup_s": startup_s,
        "parts_s": parts,
        "reward_mean": rewards,
        "settings": {"torch_threads": torch.get_num_threads()},
    }


def run_side(impl: str, args: argparse.Namespace) -> dict[str, Any]:
    """One side in its own interpreter: its JSON result, with the process's whole wall time and
    the load averages before and after."""
    command = [str(VENVS[impl]), str(Path(__file__).resolve()), "--impl", impl, "--json"]
    command += ["--iterations", str(args.iterations), "--model-dir", str(args.model_dir)]
    command += ["--prompts", str(args.prompts), "--dtype", args.dtype]
    command += ["--lag", str(args.lag), "--cpus", str(args.cpus), "--placement", args.placement]
    for override in args.overrides:
        command += ["--set", override]
    load_before = os.getloadavg()[0]
    started = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - started
    if run.returncode != 0:
        raise SystemExit(f"{impl} side failed:\n{run.stderr[-4000:]}")
    result = json.loads(run.stdout.strip().splitlines()[-1])
    return result | {"wall_s": wall, "load": (load_before, os.getloadavg()[0])}


def steady_median(seconds: list[float]) -> float:
    return statistics.median(seconds[1:] or seconds)


def summary(result: dict[str, Any]) -> dict[str, float]:
    """A side's figures in one run: the steady iteration's median, samples/s at that pace,
    the first iteration, start-up and the whole wall time."""
    iteration = steady_median(result["iteration_s"])
    return {
        "samples_per_s": PROMPTS_PER_ITERATION / iteration,
        "iteration_s": iteration,
        "first_s": result["iteration_s"][0],
        "startup_s": result["startup_s"],
        "wall_s": result["wall_s"],
    }


def ratios(results: dict[str, list[dict[str, Any]]]) -> list[tuple[str, float, str]]:
    """``TARGETS``' ratios of the sides that ran, each the median over the rounds: name, value
    and the target's reading (``"target >= 1.5: met"``; empty for those without one)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from side_by_side import median_ratio

    rows = []
    for name, ours, theirs, figure, op, bound in TARGETS:
        if ours not in results or theirs not in results:
            continue
        value = median_ratio(results[ours], results[theirs], lambda r, key=figure: summary(r)[key])
        met = value >= bound if op == ">=" else value <= bound if op == "<=" else None
        reading = "" if met is None else f"target {op} {bound}: {'met' if met else 'MISSED'}"
        rows.append((name, value, reading))
    return rows


def overlap_bound(result: dict[str, Any]) -> float:
    """The most that sampling the next batch during the learner's step can gain on a sync
    run's iteration: its parts (medians) one after another over the longer of generation and
    the rest (score, train, sync), which async mode overlaps."""
    parts = {part: steady_median(seconds) for part, seconds in result["parts_s"].items()}
    rest = sum(parts.values()) - parts["generate"]
    return (parts["generate"] + rest) / max(parts["generate"], rest)


HEADER = (
    f"{'round':>5} {'impl':>13} {'samples/s':>9} {'iteration s':>11} {'first s':>7} "
    f"{'startup s':>9} {'wall s':>7} {'load':>11}  median parts (s)"
)


def side_row(round_index: int, impl: str, result: dict[str, Any]) -> str:
    figures = summary(result)
    parts = " ".join(
        f"{part}={steady_median(seconds):.3f}" for part, seconds in result["parts_s"].items()
    )
    return (
        f"{round_index:>5} {impl:>13} {figures['samples_per_s']:>9.1f} "
        f"{figures['iteration_s']:>11.3f} {figures['first_s']:>7.1f} "
        f"{figures['startup_s']:>9.1f} {figures['wall_s']:>7.1f} "
        f"{result['load'][0]:>5.1f}/{result['load'][1]:<5.1f}  {parts}"
    )


def figures(
    results: dict[str, list[dict[str, Any]]], load_at_start: Sequence[float], iterations: int
) -> dict[str, Any]:
    """What a run reports (``--report``): each side's ``summary`` and settings per round, the
    ``ratios`` and sync's ``overlap_bound`` (median over the rounds; None without sync)."""
    sync = results.get("rlfleet")
    return {
        "iterations": iterations,
        "load_average": {"start": list(load_at_start), "end": list(os.getloadavg())},
        "sides": {
            impl: [summary(r) | {"settings": r["settings"]} for r in runs]
            for impl, runs in results.items()
        },
        "ratios": {name: {"value": v, "target": t} for name, v, t in ratios(results)},
        "sync_overlap_bound": statistics.median(map(overlap_bound, sync)) if sync else None,
    }


def compare(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from side_by_side import alternate, machine

    load_at_start = os.getloadavg()
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    args.model_dir, args.prompts = build_workload(work, args.iterations)
    print(
        f"machine: {machine()}; load average {' '.join(f'{x:.2f}' for x in load_at_start)}; "
        f"{args.iterations} iterations of {PROMPTS_PER_ITERATION} samples; rlfleet: "
        f"{args.placement}, {args.cpus} CPU(s) and OMP_NUM_THREADS={args.cpus} per role, "
        f"dtype {args.dtype}, async max_policy_lag {args.lag}; TRL: {2 * args.cpus} threads"
    )
    print(HEADER)
    results = alternate(args.sides, args.rounds, lambda impl: run_side(impl, args), side_row)
    report = figures(results, load_at_start, args.iterations)
    for name, ratio in report["ratios"].items():
        target = f" ({ratio['target']})" if ratio["target"] else ""
        print(f"{name}: {ratio['value']:.2f}{target}")
    if report["sync_overlap_bound"] is not None:
        print(
            "the most async can gain on sync's parts (sync's overlap bound): "
            f"{report['sync_overlap_bound']:.2f}x"
        )
    if args.report is not None:
        args.report.write_text(json.dumps(report, indent=1) + "\n")
    if load_at_start[0] > BUSY_LOAD:
        print(
            f"note: the bench started at a load average of {load_at_start[0]:.1f}: other work "
            "on the machine skews every side; rerun idle"
        )


def sides(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = sorted(set(names) - set(VENVS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"sides are among {sorted(VENVS)}, not {unknown}")
    return names


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=sorted(VENVS), help="run one side in this interpreter")
    parser.add_argument("--sides", type=sides, default=list(VENVS), help="comma-separated")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1, help="each side runs once per round")
    parser.add_argument("--lag", type=int, default=1, help="the async side's max_policy_lag")
    parser.add_argument(
        "--cpus",
        type=int,
        default=1,
        help="CPUs and threads of rlfleet's generator and of its learner (TRL: twice this)",
    )
    parser.add_argument(
        "--placement", choices=("disaggregated", "colocated"), default="disaggregated"
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="rlfleet's learner.dtype (the generator follows it)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="override an rlfleet job config field, e.g. generators.kv_cache_gib=0.5",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line (one side)")
    parser.add_argument("--report", type=Path, help="also write the figures as JSON there")
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--prompts", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> int:
    started = time.perf_counter()
    args = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.impl is None:
        compare(args)
        return 0
    # Before torch loads (OpenMP reads it then); Ray's workers inherit it from this process.
    os.environ["OMP_NUM_THREADS"] = str(side_threads(args.impl, args))
    if args.model_dir is None:
        work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
        args.model_dir, args.prompts = build_workload(work, args.iterations)
    run = run_trl if args.impl == "trl" else run_rlfleet
    result = {"impl": args.impl} | run(args, started)
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
