"""Builds TRL 1.16 reference data for GRPO with a tool mask (multi-turn completions).

Run with the TRL 1.16 virtualenv (``bash bench/setup_trl116_venv.sh`` creates it)::

    .venv-trl116/bin/python tests/algorithms/loss_mask_reference/make_trl_reference.py

TRL 1.16's ``GRPOTrainer`` takes a multi-turn mask from a ``rollout_func`` that returns
``env_mask`` (``_generate``: "Support custom env_mask from rollout_func (e.g., for environment
feedback masking)"; it becomes ``tool_mask``: 1 for the model's tokens, 0 for the environment's).
``_generate_and_score_completions`` then pads it with 1s, counts ``num_items_in_batch`` over
``completion_mask * tool_mask`` and ``completions/mean_length`` over the tool mask's 1s, and
``_compute_loss`` uses ``mask = completion_mask * tool_mask`` for every loss type and metric.

This script reuses the tiny GPT-2, tokenizer, prompts, rewards and trainer set-up of
``critic_free_reference/make_trl_reference.py`` (its ``trl_model``/``trl_ref_model``), and gives
the trainer a ``rollout_func`` with fixed completions of 4..10 tokens whose ``env_mask`` has holes
(one completion without any, one truncated). Cases ``trl_tool_grpo_loss_*``: ``_compute_loss`` for
each loss type (grpo, bnpo, dr_grpo, dapo) with ``beta`` 0.04 and ``num_iterations`` 2 (old
log-probabilities shifted by seeded noise as in the other script, so ratios leave the clip range),
token-level and, for grpo and dapo, sequence-level importance sampling. Stored as there: the inputs
(``tool_mask`` included), ``per_token_logps``, the loss, its gradient w.r.t. ``per_token_logps``,
TRL's metrics (with ``completions/mean_length``) and the variation between 1 and 2 threads.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
CASES_DIR = HERE / "cases"
sys.path.insert(0, str(HERE.parent / "critic_free_reference"))
import make_trl_reference as base  # noqa: E402

ENV_MASKS = [
    "1110011",
    "11",
    "1100111",
    "1111",
    "1001110001",
    "110011",
    "1111111111",
    "1011",
    "11100111",
    "110001",
    "1101",
    "111001111",
]
"""Per sample, its completion's tokens: 1 sampled by the model, 0 the environment's."""
TRUNCATED_SAMPLE = 6
"""Ends without EOS (cut at the length limit); every other completion ends with EOS."""


def completion_ids(sample: int) -> list[int]:
    """Fixed ids of the env mask's length; EOS last unless the sample is the truncated one."""
    generator = torch.Generator().manual_seed(100 + sample)
    length = len(ENV_MASKS[sample])
    ids = torch.randint(0, base.EOS_ID, (length,), generator=generator).tolist()
    if sample != TRUNCATED_SAMPLE:
        ids[-1] = base.EOS_ID
    return ids


def rollout_func(prompts: list[Any], trainer) -> dict[str, Any]:
    """TRL's multi-turn hook: prompt ids, completion ids, no sampling logprobs, the env mask."""
    tokenizer = trainer.processing_class
    return {
        "prompt_ids": [tokenizer(p)["input_ids"] for p in prompts],
        "completion_ids": [completion_ids(i) for i in range(len(prompts))],
        "logprobs": None,
        "env_mask": [[int(c) for c in mask] for mask in ENV_MASKS],
    }


def loss_cases() -> dict[str, dict[str, Any]]:
    cases = {}
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        levels = ("token", "sequence") if loss_type in ("grpo", "dapo") else ("token",)
        for level in levels:
            args = {
                "loss_type": loss_type,
                "beta": 0.04,
                "epsilon": 0.2,
                "epsilon_high": 0.28,
                "importance_sampling_level": level,
                "num_iterations": 2,
            }
            cases[f"trl_tool_grpo_loss_{loss_type}_{level}"] = {"args": args}
    return cases


CASES = loss_cases()


def run_case(name: str, out_dir: Path) -> None:
    from safetensors.torch import save_file

    case = CASES[name]
    trainer = base.make_trainer(
        "grpo", case["args"], HERE.parent / "critic_free_reference", out_dir, case
    )
    trainer.rollout_func = rollout_func
    batch = trainer._generate_and_score_completions(base.generation_inputs())
    assert "tool_mask" in batch, "TRL did not take the env_mask"
    batch["old_per_token_logps"] = base.shifted_old_logps(
        batch["old_per_token_logps"], batch["completion_mask"], seed=11
    )
    captured = {}
    forward = trainer._get_per_token_logps_and_entropies

    def capturing_forward(*args, **kwargs):
        logps, entropies, aux = forward(*args, **kwargs)
        logps.retain_grad()
        captured["per_token_logps"] = logps
        return logps, entropies, aux

    trainer._get_per_token_logps_and_entropies = capturing_forward
    generation_metrics = base.metrics_of(trainer)
    trainer._metrics["train"].clear()
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer._compute_loss(trainer.model, batch)
    loss.backward()
    tensors = base.tensors_of(batch)
    tensors["per_token_logps"] = captured["per_token_logps"].detach().clone()
    tensors["loss"] = loss.detach().reshape(1).clone()
    tensors["grad_per_token_logps"] = captured["per_token_logps"].grad.clone()
    metrics = base.metrics_of(trainer)
    metrics["completions/mean_length"] = generation_metrics["completions/mean_length"]
    record = {"metrics": metrics, "settings": base.effective_settings(trainer)}
    save_file(tensors, out_dir / f"{name}.safetensors", metadata={"format": "pt"})
    (out_dir / f"{name}.metrics.json").write_text(json.dumps(record) + "\n")


def run_all(out_dir: Path, threads: int) -> None:
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in CASES:
        run_case(name, out_dir)


def write_case_documents(one_thread: Path, two_threads: Path) -> None:
    from safetensors.torch import load_file, save_file

    CASES_DIR.mkdir(parents=True, exist_ok=True)
    for name, case in CASES.items():
        t1 = load_file(one_thread / f"{name}.safetensors")
        t2 = load_file(two_threads / f"{name}.safetensors")
        m1, settings = json.loads((one_thread / f"{name}.metrics.json").read_text()).values()
        m2, _ = json.loads((two_threads / f"{name}.metrics.json").read_text()).values()
        document = {
            "name": name,
            "trainer": "GRPOTrainer",
            "method": "_compute_loss",
            "config": {**base.BASE_ARGS, **case["args"]},
            "effective_settings": settings,
            "env_masks": ENV_MASKS,
            "truncated_sample": TRUNCATED_SAMPLE,
            "old_logp_noise": {
                "token_std": base.OLD_LOGP_NOISE,
                "row_shift": base.OLD_LOGP_ROW_SHIFT,
            },
            "metrics": m1,
            "thread_variation": {
                "tensors": base.max_abs_differences(
                    {k: v for k, v in t1.items() if v.is_floating_point()}, t2
                ),
                "metrics": base.max_abs_differences(m1, m2),
            },
        }
        save_file(t1, CASES_DIR / f"{name}.safetensors", metadata={"format": "pt"})
        (CASES_DIR / f"{name}.json").write_text(json.dumps(document, indent=1) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="run every case on this many threads")
    parser.add_argument("--out", type=Path, help="with --threads: where the raw outputs go")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    if args.threads:
        run_all(args.out, args.threads)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        runs = {n: Path(tmp) / f"threads{n}" for n in (1, 2)}
        for threads, out in runs.items():
            command = [sys.executable, __file__, "--threads", str(threads), "--out", str(out)]
            subprocess.run(command, check=True)
        write_case_documents(runs[1], runs[2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
