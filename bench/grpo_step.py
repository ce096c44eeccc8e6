"""Times one GRPO step of rlfleet against TRL 1.16's ``GRPOTrainer`` on the same CPU workload.

Workload (issue 9): a random-weight GPT-2, 4 layers x width 256 (4 heads of 64), with the demo's
1,024-token byte-level BPE vocabulary; 8 prompts x 8 samples per step (the demo's review
openings, the next 8 each step), up to 24 new tokens at temperature 1, beta 0.04, loss_type
dapo, learning rate 1e-6, one optimizer step per batch, 2 torch threads. The reward is the same
cheap Python function on both sides (the fraction of distinct words in the completion), so the
step is the trainers' work, not the reward's.

What a step is on each side:

- TRL: one ``trainer.train()`` step, ``use_cpu=True``: HF ``generate``, the reward, the old and
  reference logprobs, loss, backward and the optimizer step (timed from the Trainer's
  ``on_step_begin`` to ``on_step_end``; its phases by timing ``_generate`` and
  ``_generate_and_score_completions``).
- rlfleet: what the distributed job does per iteration, in one process: generation with vLLM
  (``actors/vllm_engine.py``'s in-process ``vllm.LLM``, one seed per rollout), decoding and the
  reward (score), ``CriticFreeTrainer.step`` with the generator's logprobs for truncated
  importance sampling (train), and the new weights reloaded into vLLM in place (sync). Ray's
  calls and the object-store transfer between actors are not included (``bench/iteration.py``
  and ``bench/weight_sync.py`` time those).

One warm-up step, then ``--steps`` timed steps; medians reported. Wall time and process CPU time
are both given: these 2-core machines are shared, and a busy neighbour stretches wall time.

    .venv/bin/python bench/grpo_step.py --impl rlfleet          # one side, in this interpreter
    .venv-trl116/bin/python bench/grpo_step.py --impl trl
    .venv/bin/python bench/grpo_step.py --compare 3             # both, alternating, with ratios

The model directory (``artifacts/bench-grpo-model``) is built by the rlfleet side (or
``--compare``) before TRL's side runs. ``--compare`` needs ``.venv-trl116``
(``bash bench/setup_trl116_venv.sh``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from side_by_side import ROOT, alternate, machine, median_ratio, run_side  # noqa: E402

VENVS = {
    "rlfleet": ROOT / ".venv" / "bin" / "python",
    "trl": ROOT / ".venv-trl116" / "bin" / "python",
}
MODEL_DIR = ROOT / "artifacts" / "bench-grpo-model"
PROMPTS = ROOT / "examples" / "demo_prompts.jsonl"
N_LAYER, N_EMBD, N_HEAD, VOCAB_SIZE = 4, 256, 4, 1024
PROMPTS_PER_STEP, GROUP_SIZE, MAX_NEW_TOKENS = 8, 8, 24
BETA, LOSS_TYPE, LEARNING_RATE, THREADS, SEED = 0.04, "dapo", 1e-6, 2, 0
BATCH_SIZE = PROMPTS_PER_STEP * GROUP_SIZE


def distinct_words(completions: list[str], **_: Any) -> list[float]:
    """The reward of both sides: the fraction of distinct words in each completion."""
    scores = []
    for completion in completions:
        words = completion.split()
        scores.append(len(set(words)) / len(words) if words else 0.0)
    return scores


def step_prompts(index: int) -> list[str]:
    """Step ``index``'s prompts: the next ``PROMPTS_PER_STEP`` demo openings."""
    prompts = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines()]
    start = index * PROMPTS_PER_STEP % len(prompts)
    return prompts[start : start + PROMPTS_PER_STEP]


def build_model_dir() -> Path:
    """The random-weight 4 x 256 GPT-2 with the demo's tokenizer (rlfleet's interpreter only)."""
    from rlfleet.tasks.tiny_model import build_tiny_model

    if not (MODEL_DIR / "model.safetensors").exists():
        build_tiny_model(
            MODEL_DIR,
            n_layer=N_LAYER,
            n_embd=N_EMBD,
            n_head=N_HEAD,
            vocab_size=VOCAB_SIZE,
            n_positions=128,
            seed=SEED,
        )
    return MODEL_DIR


class RlfleetGRPO:
    """The job's per-iteration work in one process: vLLM generation, reward, the critic-free
    step, the weight reload into vLLM."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rlfleet.actors.vllm_engine import VLLMEngine
        from rlfleet.common.config import CriticFreeConfig, GeneratorConfig
        from rlfleet.trainers.critic_free import CriticFreeTrainer

        generator_config = GeneratorConfig(max_new_tokens=MAX_NEW_TOKENS, kv_cache_gib=0.25)
        self.engine = VLLMEngine(model_dir, generator_config, seed=SEED)
        torch.set_num_threads(THREADS)
        self.generator_config = generator_config
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir)
        config = CriticFreeConfig(
            algorithm="grpo",
            batch_size=BATCH_SIZE,
            beta=BETA,
            loss_type=LOSS_TYPE,
            learning_rate=LEARNING_RATE,
            max_completion_length=MAX_NEW_TOKENS,
            seed=SEED,
        )
        self.trainer = CriticFreeTrainer(config, model, self.tokenizer)

    def step(self, index: int) -> dict[str, float]:
        """One step; returns the seconds of each phase."""
        from rlfleet.actors.engine import SamplingSpec

        seconds: dict[str, float] = {}
        started = time.perf_counter()
        prompts = [p for p in step_prompts(index) for _ in range(GROUP_SIZE)]
        prompt_ids = self.tokenizer(prompts).input_ids
        seeds = [SEED * 1_000_003 + index * BATCH_SIZE + i for i in range(BATCH_SIZE)]
        spec = SamplingSpec.from_config(self.generator_config, seeds)
        completions = self.engine.generate(prompt_ids, spec)
        seconds["generate"] = time.perf_counter() - started

        started = time.perf_counter()
        texts = self.tokenizer.batch_decode(
            [c.token_ids for c in completions], skip_special_tokens=True
        )
        scores = [torch.tensor(s) for s in distinct_words(texts)]
        seconds["score"] = time.perf_counter() - started

        started = time.perf_counter()
        self.trainer.step(
            [torch.tensor(ids) for ids in prompt_ids],
            [torch.tensor(c.token_ids) for c in completions],
            scores,
            group_ids=[i // GROUP_SIZE for i in range(BATCH_SIZE)],
            behaviour_logprobs=[torch.tensor(c.logprobs) for c in completions],
            truncated=[c.finish_reason == "length" for c in completions],
        )
        seconds["train"] = time.perf_counter() - started

        started = time.perf_counter()
        self.engine.load_weights(self.trainer.model.state_dict().items())
        seconds["sync"] = time.perf_counter() - started
        return seconds


def measure_rlfleet(steps: int) -> dict[str, Any]:
    grpo = RlfleetGRPO(build_model_dir())
    grpo.step(0)
    phases, cpu_seconds = [], []
    for index in range(1, steps + 1):
        cpu_start = time.process_time()
        phases.append(grpo.step(index))
        cpu_seconds.append(time.process_time() - cpu_start)
    step_s = [sum(p.values()) for p in phases]
    return {
        "impl": "rlfleet",
        "step_s": step_s,
        "step_cpu_s": cpu_seconds,
        "phases_s": {name: statistics.median(p[name] for p in phases) for name in phases[0]},
    }


def measure_trl(steps: int) -> dict[str, Any]:
    """``steps + 1`` steps of ``GRPOTrainer.train()``; the first is the warm-up."""
    import warnings

    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    warnings.filterwarnings("ignore")
    if not (MODEL_DIR / "model.safetensors").exists():
        raise SystemExit(f"{MODEL_DIR} is missing: run the rlfleet side (or --compare) first")
    torch.set_num_threads(THREADS)

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.wall: list[float] = []
            self.cpu: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self._start, self._cpu_start = time.perf_counter(), time.process_time()

        def on_step_end(self, args, state, control, **kwargs):
            self.wall.append(time.perf_counter() - self._start)
            self.cpu.append(time.process_time() - self._cpu_start)

    prompts = [p for index in range(steps + 1) for p in step_prompts(index)]
    times = StepTimes()
    with tempfile.TemporaryDirectory() as output_dir:
        config = GRPOConfig(
            output_dir=output_dir,
            use_cpu=True,
            per_device_train_batch_size=BATCH_SIZE,
            num_generations=GROUP_SIZE,
            max_completion_length=MAX_NEW_TOKENS,
            temperature=1.0,
            beta=BETA,
            loss_type=LOSS_TYPE,
            learning_rate=LEARNING_RATE,
            max_steps=steps + 1,
            shuffle_dataset=False,
            logging_steps=1,
            save_strategy="no",
            report_to="none",
            seed=SEED,
            dataloader_num_workers=0,
        )
        trainer = GRPOTrainer(
            model=str(MODEL_DIR),
            reward_funcs=distinct_words,
            args=config,
            train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
            processing_class=AutoTokenizer.from_pretrained(MODEL_DIR),
            callbacks=[times],
        )
        generate_s = time_calls(trainer, "_generate")
        prepare_s = time_calls(trainer, "_generate_and_score_completions")
        trainer.train()
    phases = [
        {
            "generate": generate,
            "score_and_logprobs": prepare - generate,
            "train": wall - prepare,
        }
        for generate, prepare, wall in zip(generate_s, prepare_s, times.wall, strict=True)
    ][1:]
    return {
        "impl": "trl",
        "step_s": times.wall[1:],
        "step_cpu_s": times.cpu[1:],
        "phases_s": {name: statistics.median(p[name] for p in phases) for name in phases[0]},
    }


def time_calls(obj: Any, method: str) -> list[float]:
    """Wrap ``obj.method`` so that each call's seconds are appended to the returned list."""
    seconds: list[float] = []
    original = getattr(obj, method)

    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - started)

    setattr(obj, method, timed)
    return seconds


def summarise(result: dict[str, Any]) -> dict[str, Any]:
    result["median_step_s"] = statistics.median(result["step_s"])
    result["median_step_cpu_s"] = statistics.median(result["step_cpu_s"])
    result["torch_threads"] = torch.get_num_threads()
    return result


def compare(rounds: int, steps: int) -> None:
    """Alternates the two sides ``rounds`` times (order flipped every round); prints each run,
    where rlfleet's step time goes, and the median ratio rlfleet / TRL."""
    build_model_dir()
    print(f"machine: {machine()}; load average: {Path('/proc/loadavg').read_text().strip()}")
    print(f"{'round':>5} {'impl':>8} {'median step s':>14} {'cpu s':>8}  steps s")

    def row(round_index: int, impl: str, result: dict[str, Any]) -> str:
        times = " ".join(f"{s:.2f}" for s in result["step_s"])
        return (
            f"{round_index:>5} {impl:>8} {result['median_step_s']:>14.3f} "
            f"{result['median_step_cpu_s']:>8.2f}  {times}"
        )

    results = alternate(
        VENVS, rounds, lambda impl: run_side(VENVS[impl], __file__, impl, steps), row
    )
    for impl, runs in results.items():
        phases = {
            name: statistics.median(r["phases_s"][name] for r in runs)
            for name in runs[0]["phases_s"]
        }
        by_phase = ", ".join(f"{name} {seconds:.3f}" for name, seconds in phases.items())
        print(f"{impl} step, median seconds by phase: {by_phase}")
    ratio = median_ratio(results["rlfleet"], results["trl"], "median_step_s")
    cpu_ratio = median_ratio(results["rlfleet"], results["trl"], "median_step_cpu_s")
    print(f"median step time ratio rlfleet/TRL: {ratio:.3f} (target <= 0.1)")
    print(f"median step CPU-time ratio rlfleet/TRL: {cpu_ratio:.3f}")
    print(f"load average after: {Path('/proc/loadavg').read_text().strip()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=sorted(VENVS), help="time one side in this interpreter")
    parser.add_argument("--compare", type=int, metavar="N", help="alternate both sides N times")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up")
    parser.add_argument("--json", action="store_true", help="print one JSON line (for --compare)")
    args = parser.parse_args()
    if args.compare:
        compare(args.compare, args.steps)
    elif args.impl:
        measure = measure_rlfleet if args.impl == "rlfleet" else measure_trl
        result = summarise(measure(args.steps))
        print(json.dumps(result) if args.json else f"{machine()}\n{json.dumps(result, indent=1)}")
    else:
        parser.error("give --impl or --compare")
    return 0


if __name__ == "__main__":
    sys.exit(main())
