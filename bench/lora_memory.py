"""The learner's memory: a full fine-tune with its frozen reference copy vs LoRA, whose reference
is the policy with its adapters disabled (no copy).

Per model shape (``tiny``: the test suite's GPT-2, 2 layers x 64; ``gpt2``: GPT-2 small's shape,
12 layers x 768 with the 50,257-token vocabulary, random weights built from its config, nothing
downloaded) and per case (``full``, ``lora`` with r=8 on every linear layer but the LM head), a
fresh process builds a PPOTrainer (policy with value head, reference, fused Adam) and runs one
step on 8 random samples of 32 + 32 tokens, so that the optimizer's state exists. It reports the
bytes of the policy's parameters, of the reference's parameters, of the optimizer's state, the
trainable parameter count, and the process's peak resident set size (``ru_maxrss``: libraries,
models, optimizer state and the step's activations) beside its RSS after the imports.

    .venv/bin/python bench/lora_memory.py [--shapes tiny gpt2] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

from side_by_side import machine

MIB = 2**20
SHAPES = {
    "tiny": {"vocab_size": 1024, "n_positions": 128, "n_embd": 64, "n_layer": 2, "n_head": 2},
    "gpt2": {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12},
}
CASES = ("full", "lora")
BATCH, QUERY_TOKENS, RESPONSE_TOKENS = 8, 32, 32


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tensor_bytes(tensors: Any) -> int:
    """Bytes of the distinct storages among ``tensors``."""
    storages = {}
    for tensor in tensors:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def measure(shape: str, case: str) -> dict[str, Any]:
    """One case in this process (see the module doc)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from rlfleet.common.config import LoraConfig, PPOConfig
    from rlfleet.trainers.lora import add_adapters
    from rlfleet.trainers.ppo import PPOTrainer
    from rlfleet.trainers.value_head import AutoModelForCausalLMWithValueHead

    imported_mib = peak_rss_mib()
    torch.manual_seed(0)
    model = AutoModelForCausalLMWithValueHead(GPT2LMHeadModel(GPT2Config(**SHAPES[shape])))
    if case == "lora":
        add_adapters(model.pretrained_model, LoraConfig(r=8, alpha=16))
    config = PPOConfig(batch_size=BATCH, mini_batch_size=BATCH, ppo_epochs=1, seed=0)
    trainer = PPOTrainer(config=config, model=model)
    vocab = SHAPES[shape]["vocab_size"]
    generator = torch.Generator().manual_seed(0)
    trainer.step(
        [torch.randint(0, vocab, (QUERY_TOKENS,), generator=generator) for _ in range(BATCH)],
        [torch.randint(0, vocab, (RESPONSE_TOKENS,), generator=generator) for _ in range(BATCH)],
        [torch.randn((), generator=generator) for _ in range(BATCH)],
    )
    reference = trainer.ref_model
    optimizer_state = [
        value
        for slots in trainer.optimizer.state.values()
        for value in slots.values()
        if isinstance(value, torch.Tensor)
    ]
    return {
        "shape": shape,
        "case": case,
        "parameters": sum(p.numel() for p in model.parameters()),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "policy_mib": tensor_bytes(model.parameters()) / MIB,
        "reference_mib": tensor_bytes(reference.parameters()) / MIB if reference else 0.0,
        "optimizer_state_mib": tensor_bytes(optimizer_state) / MIB,
        "rss_after_imports_mib": imported_mib,
        "peak_rss_mib": peak_rss_mib(),
    }


def run_case(shape: str, case: str) -> dict[str, Any]:
    """``measure`` in a fresh process (peak RSS is per process)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--case", shape, case]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def state_mib(row: dict[str, Any]) -> float:
    """What training holds beside the libraries: policy, reference and optimizer state."""
    return row["policy_mib"] + row["reference_mib"] + row["optimizer_state_mib"]


def report(rows: list[dict[str, Any]]) -> None:
    print(f"machine: {machine()}")
    header = "shape case   params  trainable  policy  reference  optimizer  state  peak RSS"
    print(header + "  (MiB)")
    for row in rows:
        print(
            f"{row['shape']:5} {row['case']:5} {row['parameters'] / 1e6:6.2f}M "
            f"{row['trainable_parameters'] / 1e6:9.3f}M {row['policy_mib']:7.1f} "
            f"{row['reference_mib']:10.1f} {row['optimizer_state_mib']:10.1f} "
            f"{state_mib(row):6.1f} {row['peak_rss_mib']:9.1f}"
        )
    by_case = {(row["shape"], row["case"]): row for row in rows}
    for shape in dict.fromkeys(row["shape"] for row in rows):
        full, lora = by_case[(shape, "full")], by_case[(shape, "lora")]
        saved = state_mib(full) - state_mib(lora)
        print(
            f"{shape}: LoRA holds {saved:.1f} MiB less ({state_mib(lora) / state_mib(full):.2f}x "
            f"the full fine-tune's parameters + reference + optimizer state); peak RSS "
            f"{lora['peak_rss_mib']:.0f} MiB vs {full['peak_rss_mib']:.0f} MiB"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=list(SHAPES))
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--case", nargs=2, metavar=("SHAPE", "CASE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(measure(*args.case)))
        return
    rows = [run_case(shape, case) for shape in args.shapes for case in CASES]
    report(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
