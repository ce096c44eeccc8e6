"""The CPU pipeline: an rlfleet job against TRL v0.11.4's generate / score / step loop.

Workload (issue 10): a GPT-2 of 4 layers x 256 (4 heads) with the tiny model's byte-level BPE
tokenizer (702 tokens), random weights built locally; each iteration 64 prompts of 10 tokens
(the first 10 tokens of the built-in review sentences), 24 new tokens sampled at temperature 1
(no top-k, no top-p), a reward function both sides call (``reward`` below), then a PPO step with
mini-batches of 16 and 2 PPO epochs (the other PPO settings are both trainers' defaults).

- rlfleet: ``run_job`` on a local Ray instance with one vLLM generator and one reward actor,
  every other setting the job config's default (``--learner-num-cpus``, ``--dtype`` and
  ``--set`` change them).
- TRL: ``PPOTrainer.generate`` on the 64 prompts at once (the sampling settings above), the
  reward, ``PPOTrainer.step``; in ``.venv-trl`` (``bash bench/setup_trl_venv.sh``), in float32,
  with torch's default threads (every core).

Each side runs in its own process, one after the other (the order flips every round). Reported:
the median wall time of an iteration after the first (the first pays engine warm-up), and the
whole wall time of the process, from its launch to its exit, start-up included. An rlfleet
iteration is the time between two dispatches of prompts to the generator. Also printed: the
first iteration (where vLLM's first generation loads or compiles its sampler kernel), the
start-up until the first iteration begins, each part's median, and the load average before and
after each side (the machines are shared).

    .venv/bin/python bench/pipeline.py [--iterations 20] [--rounds 1] [--learner-num-cpus N]
        [--dtype float32|bfloat16] [--set key=value ...]
    .venv/bin/python bench/pipeline.py --impl rlfleet --json ...     # one side, this interpreter
    .venv-trl/bin/python bench/pipeline.py --impl trl --json ...

Targets: an iteration at most 0.7x TRL's; the whole job at most 1.0x TRL's.
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
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VENVS = {"rlfleet": ROOT / ".venv" / "bin" / "python", "trl": ROOT / ".venv-trl" / "bin" / "python"}
N_LAYER, N_EMBD, N_HEAD = 4, 256, 4
PROMPTS_PER_ITERATION, PROMPT_TOKENS, NEW_TOKENS = 64, 10, 24
MINI_BATCH_SIZE, PPO_EPOCHS = 16, 2
SEED = 0
REWARD = "rlfleet.bench.pipeline:reward"
BUSY_LOAD = 1.0
"""A load average above this when the bench starts means other work shares the machine."""


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


def rlfleet_config(args: argparse.Namespace, work: Path):
    from rlfleet.common.config import JobConfig
    from rlfleet.common.config_file import apply_overrides

    learner: dict[str, Any] = {"dtype": args.dtype}
    if args.learner_num_cpus is not None:
        learner["num_cpus"] = args.learner_num_cpus
    config = {
        "name": "pipeline-bench",
        "model": str(args.model_dir),
        "dataset": {"path": str(args.prompts), "shuffle": False},
        "generators": {"max_new_tokens": NEW_TOKENS, "top_k": 0, "top_p": 1.0},
        "reward": {"function": REWARD},
        "learner": learner,
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


def run_rlfleet(args: argparse.Namespace, started: float) -> dict[str, Any]:
    """The job on a local Ray instance; an iteration is the time between generator dispatches
    (the last one ends when ``run_job`` returns)."""
    import ray

    from rlfleet.job.cluster import init_ray
    from rlfleet.job.train import run_job

    dispatches: list[float] = []

    def on_dispatch(kind: str, iteration: int, actors: list) -> None:
        if kind == "generator":
            dispatches.append(time.perf_counter())

    config = rlfleet_config(args, Path(tempfile.mkdtemp(prefix="bench-pipeline-")))
    init_ray(config)
    try:
        result = run_job(config, on_dispatch=on_dispatch)
        finished = time.perf_counter()
    finally:
        ray.shutdown()
    ends = [*dispatches[1:], finished]
    parts = ("generate", "score", "train", "sync")
    return {
        "iteration_s": [end - start for start, end in zip(dispatches, ends, strict=True)],
        "startup_s": dispatches[0] - started,
        "parts_s": {p: [s.get(f"time/{p}_s", 0.0) for s in result.stats] for p in parts},
        "reward_mean": [s["reward_mean"] for s in result.stats],
    }


def run_trl(args: argparse.Namespace, started: float) -> dict[str, Any]:
    """TRL v0.11.4's loop: generate the batch, score it, step."""
    import warnings

    import torch
    from transformers import AutoTokenizer
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    warnings.filterwarnings("ignore")
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
    }


def run_side(impl: str, args: argparse.Namespace) -> dict[str, Any]:
    """One side in its own interpreter: its JSON result, with the process's whole wall time and
    the load averages before and after."""
    command = [str(VENVS[impl]), str(Path(__file__).resolve()), "--impl", impl, "--json"]
    command += ["--iterations", str(args.iterations), "--model-dir", str(args.model_dir)]
    command += ["--prompts", str(args.prompts), "--dtype", args.dtype]
    if args.learner_num_cpus is not None:
        command += ["--learner-num-cpus", str(args.learner_num_cpus)]
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


def side_row(round_index: int, impl: str, result: dict[str, Any]) -> str:
    parts = " ".join(
        f"{part}={steady_median(seconds):.3f}" for part, seconds in result["parts_s"].items()
    )
    return (
        f"{round_index:>5} {impl:>8} {steady_median(result['iteration_s']):>12.3f} "
        f"{result['iteration_s'][0]:>8.1f} {result['startup_s']:>10.1f} {result['wall_s']:>9.1f} "
        f"{result['load'][0]:>5.1f}/{result['load'][1]:<5.1f}  {parts}"
    )


def compare(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(ROOT / "bench"))
    from side_by_side import alternate, machine, median_ratio

    load_at_start = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    args.model_dir, args.prompts = build_workload(work, args.iterations)
    print(f"machine: {machine()}; {args.iterations} iterations; rlfleet dtype {args.dtype}")
    print(
        f"{'round':>5} {'impl':>8} {'iteration s':>12} {'first s':>8} {'startup s':>10} "
        f"{'wall s':>9} "
        f"{'load':>11}  median parts (s)"
    )
    results = alternate(VENVS, args.rounds, lambda impl: run_side(impl, args), side_row)
    ours, trl = results["rlfleet"], results["trl"]
    iteration = median_ratio(ours, trl, lambda r: steady_median(r["iteration_s"]))
    whole = median_ratio(ours, trl, "wall_s")
    print(f"iteration time ratio rlfleet/TRL: {iteration:.2f} (target <= 0.7)")
    print(f"whole-job wall time ratio rlfleet/TRL: {whole:.2f} (target <= 1.0)")
    if load_at_start > BUSY_LOAD:
        print(
            f"note: the bench started at a load average of {load_at_start:.1f}: other work on the "
            "machine slows TRL's OpenMP threads far more than rlfleet's actors; rerun idle"
        )


def main() -> int:
    started = time.perf_counter()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=sorted(VENVS), help="run one side in this interpreter")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1, help="each side runs once per round")
    parser.add_argument("--learner-num-cpus", type=float, help="rlfleet's learner.num_cpus")
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
        help="override an rlfleet job config field, e.g. learner.num_cpus=2",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON line (one side)")
    parser.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--prompts", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.impl is None:
        compare(args)
        return 0
    if args.model_dir is None:
        work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
        args.model_dir, args.prompts = build_workload(work, args.iterations)
    run = run_rlfleet if args.impl == "rlfleet" else run_trl
    result = {"impl": args.impl} | run(args, started)
    print(json.dumps(result) if args.json else json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
