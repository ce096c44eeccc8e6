"""Times ``PPOTrainer.step()`` of rlfleet against TRL v0.11.4's on the same CPU workload.

Workload (issue 2): a GPT-2 config with the real 50,257-token vocabulary, 4 layers x width 256,
random weights built locally; batch 32, mini-batch 8, 2 PPO epochs; queries of 8-32 tokens and
responses of 8-48 tokens with random ids and scores (fixed seed). One warm-up step, then
``--steps`` timed steps, each on a fresh batch (the same batches for both implementations).

Memory: a sampling thread reads the process's resident set size (``/proc/self/statm``) every
2 ms; a step's peak memory is the highest RSS seen during the step minus the RSS just before it,
i.e. what the step itself allocates on top of the models, optimizer state and libraries. The
median over the timed steps is reported (and the process's whole-life ``ru_maxrss``). Step time
is wall-clock; the process CPU time (user + system) is reported beside it because these 2-core
machines are shared and a busy neighbour stretches wall time, not CPU time.

    .venv/bin/python bench/ppo_step.py --impl rlfleet          # one side, in this interpreter
    .venv-trl/bin/python bench/ppo_step.py --impl trl
    .venv/bin/python bench/ppo_step.py --compare 3             # both, alternating, with ratios
    .venv/bin/python bench/ppo_step.py --impl rlfleet --profile  # where rlfleet's step time goes

``--compare`` needs ``.venv-trl`` (``bash bench/setup_trl_venv.sh``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
from typing import Any

import numpy as np
import torch
from side_by_side import ROOT, alternate, machine, median_ratio, run_side, timed_steps

VENVS = {"rlfleet": ROOT / ".venv" / "bin" / "python", "trl": ROOT / ".venv-trl" / "bin" / "python"}
VOCAB_SIZE = 50257
EOS_ID = VOCAB_SIZE - 1
BATCH_SIZE, MINI_BATCH_SIZE, PPO_EPOCHS = 32, 8, 2
QUERY_LENGTHS, RESPONSE_LENGTHS = (8, 32), (8, 48)
SEED = 0


def build_policy_and_reference(impl: str):
    """Random-weight GPT-2 (real vocabulary, 4 x 256) wrapped with a value head, and a frozen
    copy as the reference, with the chosen implementation's classes."""
    import copy

    from transformers import GPT2Config, GPT2LMHeadModel

    if impl == "trl":
        from trl import AutoModelForCausalLMWithValueHead
    else:
        from rlfleet.trainers.value_head import AutoModelForCausalLMWithValueHead

    torch.manual_seed(SEED)
    config = GPT2Config(vocab_size=VOCAB_SIZE, n_positions=128, n_embd=256, n_layer=4, n_head=4)
    backbone = GPT2LMHeadModel(config)
    reference_backbone = copy.deepcopy(backbone)
    policy = AutoModelForCausalLMWithValueHead.from_pretrained(backbone)
    reference = AutoModelForCausalLMWithValueHead.from_pretrained(reference_backbone)
    for parameter in reference.parameters():
        parameter.requires_grad_(False)
    return policy, reference


def build_tokenizer():
    """A stand-in tokenizer: both trainers only need its EOS/pad ids (EOS = 50256, as GPT-2)."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    vocab = {f"t{i}": i for i in range(EOS_ID)} | {eos: EOS_ID}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=eos))
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token=eos, pad_token=eos, unk_token=eos
    )


def make_batch(index: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    rng = np.random.default_rng([SEED, index])
    queries, responses = [], []
    for _ in range(BATCH_SIZE):
        query_len = int(rng.integers(QUERY_LENGTHS[0], QUERY_LENGTHS[1] + 1))
        response_len = int(rng.integers(RESPONSE_LENGTHS[0], RESPONSE_LENGTHS[1] + 1))
        queries.append(torch.tensor(rng.integers(0, EOS_ID, size=query_len)))
        responses.append(torch.tensor(rng.integers(0, EOS_ID, size=response_len)))
    scores = [torch.tensor(float(s)) for s in rng.standard_normal(BATCH_SIZE)]
    return queries, responses, scores


def build_trainer(impl: str):
    policy, reference = build_policy_and_reference(impl)
    kwargs = {
        "batch_size": BATCH_SIZE,
        "mini_batch_size": MINI_BATCH_SIZE,
        "ppo_epochs": PPO_EPOCHS,
    }
    if impl == "trl":
        import warnings

        from trl import PPOConfig, PPOTrainer

        warnings.filterwarnings("ignore")
    else:
        from rlfleet.common.config import PPOConfig
        from rlfleet.trainers.ppo import PPOTrainer
    return PPOTrainer(PPOConfig(**kwargs), policy, reference, build_tokenizer())


def measure(impl: str, steps: int) -> dict[str, Any]:
    """Warm-up step, then ``steps`` timed steps: seconds and peak RSS growth of each."""
    trainer = build_trainer(impl)
    figures = timed_steps(lambda batch: trainer.step(*batch), make_batch, steps)
    seconds, growth = figures["step_s"], figures["step_peak_mib"]
    return {
        "impl": impl,
        "step_s": seconds,
        "median_step_s": statistics.median(seconds),
        "median_step_cpu_s": statistics.median(figures["step_cpu_s"]),
        "step_peak_mib": growth,
        "median_step_peak_mib": statistics.median(growth),
        "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": torch.get_num_threads(),
    }


def profile(steps: int) -> None:
    """torch.profiler's top operators (self CPU time) over rlfleet's timed steps."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    trainer = build_trainer("rlfleet")
    trainer.step(*make_batch(0))
    batches = [make_batch(i) for i in range(1, steps + 1)]
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for batch in batches:
            stats = trainer.step(*batch)
    print({k: round(v, 3) for k, v in stats.items() if k.startswith("time/ppo/")})
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def compare(rounds: int, steps: int) -> None:
    """Alternates the two sides ``rounds`` times (order flipped every round) and prints a table
    and the median ratios rlfleet / TRL."""
    print(f"machine: {machine()}")
    print(
        f"{'round':>5} {'impl':>8} {'median step s':>14} {'cpu s':>8} {'steps s':>24} "
        f"{'step peak MiB':>14}"
    )

    def row(round_index: int, impl: str, result: dict[str, Any]) -> str:
        times = " ".join(f"{s:.2f}" for s in result["step_s"])
        return (
            f"{round_index:>5} {impl:>8} {result['median_step_s']:>14.2f} "
            f"{result['median_step_cpu_s']:>8.2f} {times:>24} "
            f"{result['median_step_peak_mib']:>14.0f}"
        )

    results = alternate(
        VENVS, rounds, lambda impl: run_side(VENVS[impl], __file__, impl, steps), row
    )

    def ratio(key: str) -> float:
        return median_ratio(results["rlfleet"], results["trl"], key)

    print(f"median step time ratio rlfleet/TRL: {ratio('median_step_s'):.3f} (target <= 0.3)")
    print(f"median step CPU-time ratio rlfleet/TRL: {ratio('median_step_cpu_s'):.3f}")
    print(
        f"median step peak memory ratio rlfleet/TRL: {ratio('median_step_peak_mib'):.3f} "
        "(target < 1)"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=sorted(VENVS), help="time one side in this interpreter")
    parser.add_argument("--compare", type=int, metavar="N", help="alternate both sides N times")
    parser.add_argument("--steps", type=int, default=2, help="timed steps after the warm-up")
    parser.add_argument("--json", action="store_true", help="print one JSON line (for --compare)")
    parser.add_argument("--profile", action="store_true", help="profile rlfleet's step")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.compare:
        compare(args.compare, args.steps)
    elif args.profile:
        profile(args.steps)
    elif args.impl:
        result = measure(args.impl, args.steps)
        print(json.dumps(result) if args.json else f"{machine()}\n{json.dumps(result, indent=1)}")
    else:
        parser.error("give --impl, --compare or --profile")
    return 0


if __name__ == "__main__":
    sys.exit(main())
