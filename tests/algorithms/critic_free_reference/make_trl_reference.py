"""Builds TRL 1.16 reference data for the critic-free algorithms (GRPO, RLOO).

Run with the TRL 1.16 virtualenv (``bash bench/setup_trl116_venv.sh`` creates it)::

    .venv-trl116/bin/python tests/algorithms/critic_free_reference/make_trl_reference.py

It builds a tiny GPT-2 (vocab 128, 2 layers, width 32, dropouts 0, eager attention) and a
word-level tokenizer offline from fixed seeds, saves them under ``trl_model/`` (the policy) and
``trl_ref_model/`` (the reference model: same architecture, another seed), and runs TRL's own code
paths on crafted batches. Only the sampler is replaced: each trainer's ``_generate_single_turn``
returns fixed completion ids (lengths 1..8, EOS-terminated, two truncated at 8), and the reward
functions return fixed scores. Everything else is TRL's: prompt tokenisation and left padding,
completion right padding, ``mask_truncated_completions``, the reward aggregation and group
advantages (``_generate_and_score_completions``), the old/reference log-probabilities (the fused
LM head TRL patches onto the model), and ``GRPOTrainer._compute_loss`` with its metrics.

Cases (``cases/trl_*.safetensors`` tensors, ``cases/trl_*.json`` settings, metrics, variation):

- ``trl_grpo_adv_*``: ``GRPOTrainer._generate_and_score_completions`` on 3 prompts x 4 samples
  with rewards chosen to hit the corners: group 0 all equal, group 1 one distinct value, group 2
  spread. ``scale_rewards`` group | batch | none, two weighted reward functions, an unscorable
  completion (reward ``None``), and ``mask_truncated_completions`` with ``beta`` and
  ``num_iterations: 2`` (so TRL computes old and reference log-probabilities).
- ``trl_grpo_loss_*``: ``GRPOTrainer._compute_loss`` for every ``loss_type`` in grpo | bnpo |
  dr_grpo | dapo x ``beta`` 0 | 0.04 x ``epsilon_high`` none | 0.28 x
  ``importance_sampling_level`` token | sequence x ``num_iterations`` 1 | 2, plus two
  ``use_bias_correction_kl: false`` variants. The batch comes from
  ``_generate_and_score_completions`` (group-scaled advantages; reference log-probabilities from
  the reference model when ``beta`` is set). With ``num_iterations: 2`` TRL computes the old
  log-probabilities, and the script shifts them on the completion tokens by seeded noise (std
  ``OLD_LOGP_NOISE`` per token plus a uniform shift up to ``OLD_LOGP_ROW_SHIFT`` per sequence): a
  policy that moved since sampling, so token and sequence ratios leave the clip range. Stored:
  the inputs, ``per_token_logps`` (TRL's forward at those inputs) and ``entropies``, the loss,
  its gradient with respect to ``per_token_logps`` and to ``transformer.ln_f.bias``, and
  ``trainer._metrics`` (kl, entropy, clip ratios). The loss and gradient are a pure function of
  ``per_token_logps``, ``old_per_token_logps`` (absent: ``per_token_logps.detach()``),
  ``ref_per_token_logps``, ``advantages``, ``completion_mask`` and ``num_items_in_batch``.
- ``trl_rloo_adv_*``: ``RLOOTrainer._generate_and_score_completions`` (leave-one-out baseline,
  ``beta`` 0 and 0.05 with its sequence-level k1 KL in the reward, ``normalize_advantages``).
  RLOOTrainer returns only sequence sums (``old_logps``), so the per-token log-probabilities of
  its policy and reference forward passes are recorded as ``forward_per_token_logps`` and
  ``forward_ref_per_token_logps``.

Each JSON holds the case's config, ``effective_settings`` (what the trainer acts on after TRL's
defaults: epsilons, ``use_bias_correction_kl``, ``max_completion_length``...), the prompts and
completion ids, TRL's metrics and the thread variation.

Every case runs once with ``torch.set_num_threads(1)`` (the stored data) and once with 2 threads;
each JSON's ``thread_variation`` gives, per stored float tensor and per metric, the largest
absolute difference between the two runs.

Measured on the machine in ``versions_trl.json``: 1 vs 2 threads change nothing but
``grad_ln_f_bias`` (at most 1.4e-9); cross-CPU (Xeon vs EPYC) variation is not measured here.

TRL 1.16 behaviour met here:

- Group std is the unbiased (Bessel) std (``trl.trainer.utils.nanstd``), eps 1e-4 added to the
  std, not to the variance. ``scale_rewards: batch`` still subtracts the *group* mean and divides
  by the unbiased std of the whole batch's rewards (not of the centred advantages).
  ``scale_rewards: none`` only centres on the group mean.
- ``dr_grpo`` divides the masked token sum by ``batch_size * max_completion_length`` (the config
  value, not the padded width); ``dapo`` by ``num_items_in_batch`` (the generation batch's
  completion tokens after truncation masking); ``bnpo`` by the local batch's token count; ``grpo``
  averages per-sequence token means.
- Sequence-level importance sampling is accepted for every loss type; TRL only warns for bnpo,
  dr_grpo, dapo (and cispo). The sequence ratio is ``exp(mean over tokens of log ratio)``.
- ``use_bias_correction_kl`` defaults to True: the k3 KL term is multiplied by the (differentiable)
  importance ratio, which changes the KL gradient even on-policy where the ratio is 1.
- With ``num_iterations: 1`` and aligned accumulation TRL skips the old-logprob forward pass and
  uses ``per_token_logps.detach()``.
- The completion mask covers the EOS token; log-probabilities are 0 at padded positions (and on
  whole rows that ``mask_truncated_completions`` masked, since the mask also enters attention).
- RLOO's KL penalty is k1 summed over the sequence (``beta * sum(old - ref)``) subtracted from
  the reward before the leave-one-out baseline; its loss is sequence-level.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
CASES_DIR = HERE / "cases"
VOCAB_SIZE = 128
EOS_ID = VOCAB_SIZE - 1
EOS_TOKEN = "<|endoftext|>"
POLICY_SEED, REF_SEED = 1234, 1235
MODEL_CONFIG = {
    "vocab_size": VOCAB_SIZE,
    "n_positions": 48,
    "n_embd": 32,
    "n_layer": 2,
    "n_head": 2,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
    "bos_token_id": EOS_ID,
    "eos_token_id": EOS_ID,
    "pad_token_id": EOS_ID,
}
NUM_GENERATIONS = 4
MAX_COMPLETION_LENGTH = 10
"""Larger than the longest crafted completion (8), so dr_grpo's constant differs from the width."""
PROMPTS = ["t3 t17 t42", "t5 t9", "t60 t61 t62 t63 t64"]
GROUP_SCORES = [[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0], [0.3, -1.2, 2.5, 0.7]]
FORMAT_SCORES = [[0.5, 0.0, 1.0, 0.5], [1.0, 1.0, 0.0, 0.0], [0.2, 0.2, 0.9, 0.1]]
OLD_LOGP_NOISE = 0.3
OLD_LOGP_ROW_SHIFT = 0.4
"""Per-sequence shift range of the old log-probabilities, so sequence-level ratios clip too."""
EFFECTIVE_SETTINGS = (
    "scale_rewards",
    "loss_type",
    "beta",
    "epsilon_low",
    "epsilon_high",
    "importance_sampling_level",
    "num_iterations",
    "max_completion_length",
    "mask_truncated_completions",
    "num_generations",
    "temperature",
    "normalize_advantages",
)
BASE_ARGS = {
    "per_device_train_batch_size": NUM_GENERATIONS * len(PROMPTS),
    "num_generations": NUM_GENERATIONS,
    "max_completion_length": MAX_COMPLETION_LENGTH,
    "disable_dropout": True,
    "use_cpu": True,
    "report_to": [],
    "logging_steps": 1,
    "seed": 0,
    "model_init_kwargs": {"attn_implementation": "eager"},
}


def completion_ids_for(sample: int) -> list[int]:
    """Fixed completion ids: lengths 1..8, EOS-terminated except every fifth (truncated at 8)."""
    rng = np.random.default_rng([7, sample])
    if sample % 5 == 2:
        return rng.integers(0, EOS_ID, size=8).tolist()
    length = 1 + sample % 7
    return rng.integers(0, EOS_ID, size=length - 1).tolist() + [EOS_ID]


def grpo_adv_cases() -> dict[str, dict[str, Any]]:
    single = {"reward_weights": None, "two_rewards": False, "unscorable": None}
    return {
        "trl_grpo_adv_scale_group": {"args": {"scale_rewards": "group"}, **single},
        "trl_grpo_adv_scale_batch": {"args": {"scale_rewards": "batch"}, **single},
        "trl_grpo_adv_scale_none": {"args": {"scale_rewards": "none"}, **single},
        "trl_grpo_adv_two_rewards_weighted": {
            "args": {"scale_rewards": "group", "reward_weights": [1.0, 0.5]},
            **{**single, "two_rewards": True},
        },
        "trl_grpo_adv_unscorable": {
            "args": {"scale_rewards": "group"},
            **{**single, "unscorable": 9},
        },
        "trl_grpo_adv_mask_truncated_beta_iter2": {
            "args": {
                "scale_rewards": "group",
                "mask_truncated_completions": True,
                "beta": 0.04,
                "num_iterations": 2,
            },
            **single,
        },
    }


def grpo_loss_cases() -> dict[str, dict[str, Any]]:
    cases = {}
    for loss_type in ("grpo", "bnpo", "dr_grpo", "dapo"):
        for beta in (0.0, 0.04):
            for epsilon_high in (None, 0.28):
                for level in ("token", "sequence"):
                    for iterations in (1, 2):
                        name = (
                            f"trl_grpo_loss_{loss_type}_beta{beta:g}"
                            f"_eps{'0.2-0.28' if epsilon_high else '0.2'}_{level}_iter{iterations}"
                        )
                        args = {
                            "loss_type": loss_type,
                            "beta": beta,
                            "epsilon": 0.2,
                            "epsilon_high": epsilon_high,
                            "importance_sampling_level": level,
                            "num_iterations": iterations,
                        }
                        cases[name] = {"args": args}
    for loss_type in ("grpo", "dapo"):
        name = f"trl_grpo_loss_{loss_type}_beta0.04_no_bias_correction_kl_token_iter2"
        cases[name] = {
            "args": {
                "loss_type": loss_type,
                "beta": 0.04,
                "epsilon": 0.2,
                "importance_sampling_level": "token",
                "num_iterations": 2,
                "use_bias_correction_kl": False,
            }
        }
    return cases


def rloo_adv_cases() -> dict[str, dict[str, Any]]:
    return {
        "trl_rloo_adv_beta0": {"args": {"beta": 0.0}},
        "trl_rloo_adv_beta0.05": {"args": {"beta": 0.05}},
        "trl_rloo_adv_beta0.05_normalized": {"args": {"beta": 0.05, "normalize_advantages": True}},
    }


GRPO_ADV_CASES = grpo_adv_cases()
GRPO_LOSS_CASES = grpo_loss_cases()
RLOO_ADV_CASES = rloo_adv_cases()
ALL_CASES = {**GRPO_ADV_CASES, **GRPO_LOSS_CASES, **RLOO_ADV_CASES}


def build_tokenizer():
    """A word-level tokenizer over ``t0 .. t126`` plus EOS (id 127), which is also the pad."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(VOCAB_SIZE - 1)} | {EOS_TOKEN: EOS_ID}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=EOS_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        model_max_length=MODEL_CONFIG["n_positions"],
    )


def write_models(out_dir: Path) -> None:
    """``trl_model/`` (policy) and ``trl_ref_model/`` (reference) with the tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel

    for name, seed in (("trl_model", POLICY_SEED), ("trl_ref_model", REF_SEED)):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(GPT2Config(**MODEL_CONFIG))
        model.save_pretrained(out_dir / name)
        build_tokenizer().save_pretrained(out_dir / name)


def load_reference_weights(trainer, model_dir: Path) -> None:
    """TRL builds its reference model from the policy's path; give it the other seed's weights
    so the KL terms are not zero."""
    from safetensors.torch import load_file

    state = load_file(model_dir / "trl_ref_model" / "model.safetensors")
    missing, unexpected = trainer.ref_model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)


def fixed_sampler(batch_size: int, with_logprobs: bool):
    """Replaces the trainer's sampler: fixed completion ids (and no sampling logprobs)."""

    def generate_single_turn(prompt_ids, images, multimodal_fields, *num_generations):
        assert len(prompt_ids) == batch_size
        completion_ids = [completion_ids_for(i) for i in range(batch_size)]
        return (completion_ids, None) if with_logprobs else completion_ids

    return generate_single_turn


def reward_function(name: str, table: list[list[float]], unscorable: int | None):
    """A named reward function returning ``table`` flattened (``None`` at ``unscorable``)."""

    def reward(prompts, completions, **kwargs):
        scores: list[float | None] = [s for group in table for s in group]
        if unscorable is not None:
            scores[unscorable] = None
        return scores

    reward.__name__ = name
    return reward


def make_trainer(kind: str, args: dict[str, Any], model_dir: Path, out_dir: Path, case: dict):
    """A GRPOTrainer or RLOOTrainer on the tiny policy with the fixed sampler and rewards."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    config_cls, trainer_cls = (GRPOConfig, GRPOTrainer)
    if kind == "rloo":
        config_cls, trainer_cls = RLOOConfig, RLOOTrainer
    config = config_cls(output_dir=str(out_dir / "trainer"), **BASE_ARGS, **args)
    rewards = [reward_function("correct", GROUP_SCORES, case.get("unscorable"))]
    if case.get("two_rewards"):
        rewards.append(reward_function("format", FORMAT_SCORES, case.get("unscorable")))
    trainer = trainer_cls(
        model=str(model_dir / "trl_model"),
        reward_funcs=rewards,
        args=config,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=build_tokenizer(),
    )
    if trainer.ref_model is not None:
        load_reference_weights(trainer, model_dir)
    batch_size = NUM_GENERATIONS * len(PROMPTS)
    trainer._generate_single_turn = fixed_sampler(batch_size, with_logprobs=kind == "grpo")
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    return trainer


def generation_inputs() -> list[dict[str, str]]:
    """The rows TRL's RepeatSampler would yield: each prompt ``NUM_GENERATIONS`` times."""
    return [{"prompt": p} for p in PROMPTS for _ in range(NUM_GENERATIONS)]


def tensors_of(batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone().contiguous() for k, v in batch.items() if isinstance(v, torch.Tensor)
    }


def metrics_of(trainer) -> dict[str, list[float]]:
    return {k: [float(x) for x in v] for k, v in trainer._metrics["train"].items()}


def record_forwards(trainer) -> dict[str, torch.Tensor]:
    """Records the per-token log-probabilities of each no-grad forward pass TRL makes while
    scoring (RLOOTrainer returns only their sequence sums), keyed by which model made it."""
    records: dict[str, torch.Tensor] = {}
    forward = trainer._get_per_token_logps_and_entropies

    def recording_forward(model, *args, **kwargs):
        logps, entropies, aux = forward(model, *args, **kwargs)
        is_ref = model is trainer.ref_model
        key = "forward_ref_per_token_logps" if is_ref else "forward_per_token_logps"
        records[key] = logps.detach().clone()
        return logps, entropies, aux

    trainer._get_per_token_logps_and_entropies = recording_forward
    return records


def run_generation_case(kind: str, name: str, model_dir: Path, out_dir: Path):
    case = ALL_CASES[name]
    trainer = make_trainer(kind, case["args"], model_dir, out_dir, case)
    forwards = record_forwards(trainer)
    batch = trainer._generate_and_score_completions(generation_inputs())
    tensors = tensors_of(batch) | forwards
    tensors["scores_correct"] = torch.tensor(GROUP_SCORES).flatten()
    if case.get("two_rewards"):
        tensors["scores_format"] = torch.tensor(FORMAT_SCORES).flatten()
    return tensors, {"metrics": metrics_of(trainer), "settings": effective_settings(trainer)}


def shifted_old_logps(old: torch.Tensor, mask: torch.Tensor, seed: int) -> torch.Tensor:
    """Old log-probabilities of a policy that moved since sampling: seeded noise on tokens plus
    a seeded shift per sequence."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(old.shape, generator=generator) * OLD_LOGP_NOISE
    shift = (torch.rand(old.shape[0], 1, generator=generator) * 2 - 1) * OLD_LOGP_ROW_SHIFT
    return old + (noise + shift) * mask


def effective_settings(trainer) -> dict[str, Any]:
    """The values the trainer acts on (after TRL's defaults and conversions)."""
    settings = {k: getattr(trainer, k) for k in EFFECTIVE_SETTINGS if hasattr(trainer, k)}
    settings["use_bias_correction_kl"] = getattr(trainer.args, "use_bias_correction_kl", None)
    settings["reward_weights"] = trainer.reward_weights.tolist()
    settings["reward_func_names"] = list(trainer.reward_func_names)
    settings["steps_per_generation"] = trainer.args.steps_per_generation
    settings["gradient_accumulation_steps"] = trainer.args.gradient_accumulation_steps
    settings["has_ref_model"] = trainer.ref_model is not None
    return settings


def run_loss_case(name: str, model_dir: Path, out_dir: Path):
    case = ALL_CASES[name]
    trainer = make_trainer("grpo", case["args"], model_dir, out_dir, case)
    batch = trainer._generate_and_score_completions(generation_inputs())
    if "old_per_token_logps" in batch:
        batch["old_per_token_logps"] = shifted_old_logps(
            batch["old_per_token_logps"], batch["completion_mask"], seed=11
        )
    captured = {}
    forward = trainer._get_per_token_logps_and_entropies

    def capturing_forward(*args, **kwargs):
        logps, entropies, aux = forward(*args, **kwargs)
        logps.retain_grad()
        captured["per_token_logps"], captured["entropies"] = logps, entropies
        return logps, entropies, aux

    trainer._get_per_token_logps_and_entropies = capturing_forward
    trainer._metrics["train"].clear()
    trainer.model.zero_grad(set_to_none=True)
    loss = trainer._compute_loss(trainer.model, batch)
    loss.backward()
    tensors = tensors_of(batch)
    tensors["per_token_logps"] = captured["per_token_logps"].detach().clone()
    tensors["entropies"] = captured["entropies"].detach().clone()
    tensors["loss"] = loss.detach().reshape(1).clone()
    tensors["grad_per_token_logps"] = captured["per_token_logps"].grad.clone()
    ln_f_bias = dict(trainer.model.named_parameters())["transformer.ln_f.bias"]
    tensors["grad_ln_f_bias"] = ln_f_bias.grad.clone()
    return tensors, {"metrics": metrics_of(trainer), "settings": effective_settings(trainer)}


def run_case(name: str, model_dir: Path, out_dir: Path) -> None:
    """Runs one case and writes ``NAME.safetensors`` and ``NAME.metrics.json`` into ``out_dir``."""
    from safetensors.torch import save_file

    if name in GRPO_LOSS_CASES:
        tensors, record = run_loss_case(name, model_dir, out_dir)
    else:
        kind = "grpo" if name in GRPO_ADV_CASES else "rloo"
        tensors, record = run_generation_case(kind, name, model_dir, out_dir)
    save_file(tensors, out_dir / f"{name}.safetensors", metadata={"format": "pt"})
    (out_dir / f"{name}.metrics.json").write_text(json.dumps(record) + "\n")


def run_all(model_dir: Path, out_dir: Path, threads: int) -> None:
    """Every case in this process (one trainer each) on ``threads`` torch threads."""
    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    torch.set_num_threads(threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ALL_CASES:
        run_case(name, model_dir, out_dir)


def max_abs_differences(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """Per float tensor (or metric), the largest |a - b| (NaN-aware: NaN equals NaN)."""
    out = {}
    for key, value in a.items():
        x = torch.as_tensor(value, dtype=torch.float64)
        y = torch.as_tensor(b[key], dtype=torch.float64)
        if not torch.is_floating_point(torch.as_tensor(value)) and not isinstance(value, list):
            continue
        both_nan = torch.isnan(x) & torch.isnan(y)
        diff = torch.where(both_nan, torch.zeros_like(x), (x - y).abs())
        out[key] = float(diff.max()) if diff.numel() else 0.0
    return out


def write_case_documents(one_thread: Path, two_threads: Path) -> None:
    """Copies the 1-thread tensors into ``cases/`` with a JSON of settings, metrics, variation."""
    from safetensors.torch import load_file, save_file

    CASES_DIR.mkdir(parents=True, exist_ok=True)
    for name, case in ALL_CASES.items():
        t1 = load_file(one_thread / f"{name}.safetensors")
        t2 = load_file(two_threads / f"{name}.safetensors")
        m1, settings = json.loads((one_thread / f"{name}.metrics.json").read_text()).values()
        m2, _ = json.loads((two_threads / f"{name}.metrics.json").read_text()).values()
        document = {
            "name": name,
            "trainer": "RLOOTrainer" if name in RLOO_ADV_CASES else "GRPOTrainer",
            "method": (
                "_compute_loss" if name in GRPO_LOSS_CASES else "_generate_and_score_completions"
            ),
            "config": {**BASE_ARGS, **case["args"]},
            "effective_settings": settings,
            "prompts": PROMPTS,
            "num_generations": NUM_GENERATIONS,
            "completion_ids": [completion_ids_for(i) for i in range(len(generation_inputs()))],
            "eos_token_id": EOS_ID,
            "pad_token_id": EOS_ID,
            "unscorable_sample": case.get("unscorable"),
            "old_logp_noise": (
                {"token_std": OLD_LOGP_NOISE, "row_shift": OLD_LOGP_ROW_SHIFT}
                if name in GRPO_LOSS_CASES and "old_per_token_logps" in t1
                else None
            ),
            "metrics": m1,
            "thread_variation": {
                "tensors": max_abs_differences(
                    {k: v for k, v in t1.items() if v.is_floating_point()}, t2
                ),
                "metrics": max_abs_differences(m1, m2),
            },
        }
        save_file(t1, CASES_DIR / f"{name}.safetensors", metadata={"format": "pt"})
        (CASES_DIR / f"{name}.json").write_text(json.dumps(document, indent=1) + "\n")


def cpu_model() -> str:
    """The CPU's model name: float32 results differ in the last bits between CPU families."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def write_versions() -> None:
    import accelerate
    import transformers
    import trl

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "accelerate": accelerate.__version__,
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "torch_threads": "1 (stored data); 2 (thread_variation)",
    }
    (HERE / "versions_trl.json").write_text(json.dumps(versions, indent=1) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="run every case on this many threads")
    parser.add_argument("--out", type=Path, help="with --threads: where the raw outputs go")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    if args.threads:
        run_all(HERE, args.out, args.threads)
        return 0
    write_models(HERE)
    write_versions()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {n: Path(tmp) / f"threads{n}" for n in (1, 2)}
        for threads, out in runs.items():
            print(f"all cases on {threads} thread(s)", flush=True)
            command = [sys.executable, __file__, "--threads", str(threads), "--out", str(out)]
            subprocess.run(command, check=True)
        write_case_documents(runs[1], runs[2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
