"""Builds veRL 0.9.1 reference data for the critic-free advantage estimators.

Run with the veRL virtualenv (``bash bench/setup_verl_venv.sh`` creates it: ``verl`` installed
with ``--no-deps`` plus the few packages ``verl.trainer.ppo.core_algos`` needs to import)::

    .venv-verl/bin/python tests/algorithms/critic_free_reference/make_verl_reference.py

Each case calls one estimator of ``verl.trainer.ppo.core_algos`` on a small seeded batch of
3 prompts x 4 responses (``index``: the prompt's uid per response, as veRL groups them) with
right-padded response masks of lengths 1..8, and writes ``cases/verl_NAME.safetensors`` (inputs
and outputs) and ``cases/verl_NAME.json`` (the function, its arguments, and the variation between
1 and 2 torch threads). Scores sit on each response's last valid token, as veRL's reward managers
place them (``token_level_scores``); group 0 has all-equal scores, group 1 one distinct score.

The in-reward KL penalty (REINFORCE++) is what veRL's trainer does in
``verl.trainer.ppo.ray_trainer.apply_kl_penalty`` with a fixed controller:
``token_level_rewards = token_level_scores - beta * core_algos.kl_penalty(old_log_prob,
ref_log_prob, kl_penalty) * response_mask``. ``ray_trainer`` itself does not import without
veRL's full dependency set, so this script makes those two calls itself; the KL estimator is
veRL's own ``core_algos.kl_penalty``.

veRL 0.9.1 behaviour worth knowing:

- ``compute_grpo_outcome_advantage``: eps 1e-6 (TRL: 1e-4), ``torch.std`` (unbiased), a group of
  one response gets mean 0 and std 1.
- ``compute_rloo_outcome_advantage``: ``(r - mean) * n / (n - 1)``, equal to ``r - mean of the
  others``; no normalisation.
- ``compute_reinforce_plus_plus_outcome_advantage``: discounted returns (``config.gamma``) over
  response tokens, then ``masked_whiten`` over every valid token of the batch (token-weighted
  mean, unbiased variance, ``rsqrt(var + 1e-8)``), times the mask. Returns are not whitened.
- ``compute_reinforce_plus_plus_baseline_outcome_advantage``: sums the token rewards to a score,
  subtracts the group mean (no std), broadcasts to every valid token and whitens over the batch's
  tokens as above.
- ``kl_penalty("kl")`` is k1 (``logp - ref_logp``); ``"low_var_kl"`` is k3 clamped to [-10, 10].

OpenRLHF 0.11.2 defines the same estimators differently in places (read from its source,
``openrlhf/trainer/ppo_utils/experience_maker.py`` ``compute_advantages_and_returns`` and
``openrlhf/models/utils.py`` ``compute_reward``; it does not import without ``flash_attn`` and
``deepspeed``, so no data comes from it): the group step acts on the scalar reward first (rloo:
``r - (sum - r) / (n - 1)``; reinforce_baseline: ``r - group mean``), then the per-token reward
is ``-kl_coef * kl`` (k1 of rollout-policy vs reference log-probs by default) plus the scalar on
the last action token, then cumulative returns (gamma forced to 1 except for ``reinforce``);
whitening over the batch's action tokens (reinforce, reinforce_baseline, not rloo) uses the
*biased* variance and ``rsqrt(var.clamp(min=1e-8))``, where veRL uses the unbiased variance and
``rsqrt(var + 1e-8)``.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
CASES_DIR = HERE / "cases"
NUM_PROMPTS, GROUP_SIZE, WIDTH = 3, 4, 8
GROUP_SCORES = [[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 1.0], [0.3, -1.2, 2.5, 0.7]]

CASES: dict[str, dict[str, Any]] = {
    "verl_grpo": {"estimator": "compute_grpo_outcome_advantage", "kwargs": {}},
    "verl_grpo_no_std": {
        "estimator": "compute_grpo_outcome_advantage",
        "kwargs": {"norm_adv_by_std_in_grpo": False},
    },
    "verl_rloo": {"estimator": "compute_rloo_outcome_advantage", "kwargs": {}},
    "verl_rloo_vectorized": {
        "estimator": "compute_rloo_vectorized_outcome_advantage",
        "kwargs": {},
    },
    "verl_reinforce_pp": {
        "estimator": "compute_reinforce_plus_plus_outcome_advantage",
        "config": {"gamma": 1.0},
    },
    "verl_reinforce_pp_kl_k1_beta0.05": {
        "estimator": "compute_reinforce_plus_plus_outcome_advantage",
        "config": {"gamma": 1.0},
        "kl": {"kl_penalty": "kl", "beta": 0.05},
    },
    "verl_reinforce_pp_kl_k3_beta0.05_gamma0.9": {
        "estimator": "compute_reinforce_plus_plus_outcome_advantage",
        "config": {"gamma": 0.9},
        "kl": {"kl_penalty": "low_var_kl", "beta": 0.05},
    },
    "verl_reinforce_pp_baseline": {
        "estimator": "compute_reinforce_plus_plus_baseline_outcome_advantage",
        "kwargs": {},
    },
    "verl_reinforce_pp_baseline_kl_k1_beta0.05": {
        "estimator": "compute_reinforce_plus_plus_baseline_outcome_advantage",
        "kwargs": {},
        "kl": {"kl_penalty": "kl", "beta": 0.05},
    },
}


def make_batch() -> dict[str, torch.Tensor]:
    """Seeded response masks (lengths 1..8), scores on the last valid token, log-probs."""
    rng = np.random.default_rng(2026)
    batch_size = NUM_PROMPTS * GROUP_SIZE
    lengths = [1 + (i * 5) % WIDTH for i in range(batch_size)]
    mask = torch.zeros(batch_size, WIDTH, dtype=torch.float32)
    scores = torch.zeros(batch_size, WIDTH, dtype=torch.float32)
    flat_scores = [s for group in GROUP_SCORES for s in group]
    for row, length in enumerate(lengths):
        mask[row, :length] = 1.0
        scores[row, length - 1] = flat_scores[row]
    old = torch.tensor(rng.normal(-2.0, 0.8, size=(batch_size, WIDTH)), dtype=torch.float32)
    ref = old + torch.tensor(rng.normal(0.0, 0.3, size=(batch_size, WIDTH)), dtype=torch.float32)
    return {
        "response_mask": mask,
        "token_level_scores": scores,
        "old_log_prob": old * mask,
        "ref_log_prob": ref * mask,
        "group": torch.arange(NUM_PROMPTS).repeat_interleave(GROUP_SIZE),
    }


def run_case(name: str) -> dict[str, torch.Tensor]:
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo import core_algos

    case = CASES[name]
    batch = make_batch()
    mask = batch["response_mask"]
    rewards = batch["token_level_scores"].clone()
    if "kl" in case:
        kld = core_algos.kl_penalty(
            batch["old_log_prob"], batch["ref_log_prob"], kl_penalty=case["kl"]["kl_penalty"]
        )
        rewards = rewards - case["kl"]["beta"] * (kld * mask)
    index = np.array([f"uid{g}" for g in batch["group"].tolist()], dtype=object)
    estimator = getattr(core_algos, case["estimator"])
    config = AlgoConfig(**case["config"]) if "config" in case else None
    advantages, returns = estimator(
        token_level_rewards=rewards.clone(),
        response_mask=mask,
        index=index,
        config=config,
        **case.get("kwargs", {}),
    )
    return batch | {"token_level_rewards": rewards, "advantages": advantages, "returns": returns}


def run_all(out_dir: Path, threads: int) -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in CASES:
        tensors = {k: v.clone().contiguous() for k, v in run_case(name).items()}
        save_file(tensors, out_dir / f"{name}.safetensors", metadata={"format": "pt"})


def max_abs_differences(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, float]:
    return {
        k: float((v.double() - b[k].double()).abs().max())
        for k, v in a.items()
        if v.is_floating_point()
    }


def write_case_documents(one_thread: Path, two_threads: Path) -> None:
    from safetensors.torch import load_file, save_file

    CASES_DIR.mkdir(parents=True, exist_ok=True)
    for name, case in CASES.items():
        t1 = load_file(one_thread / f"{name}.safetensors")
        t2 = load_file(two_threads / f"{name}.safetensors")
        document = {
            "name": name,
            "function": f"verl.trainer.ppo.core_algos.{case['estimator']}",
            "kwargs": case.get("kwargs", {}),
            "algo_config": case.get("config"),
            "kl_in_reward": case.get("kl"),
            "num_prompts": NUM_PROMPTS,
            "group_size": GROUP_SIZE,
            "thread_variation": {"tensors": max_abs_differences(t1, t2)},
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
    import verl

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "verl": verl.__version__,
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "torch_threads": "1 (stored data); 2 (thread_variation)",
    }
    (HERE / "versions_verl.json").write_text(json.dumps(versions, indent=1) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, help="run every case on this many threads")
    parser.add_argument("--out", type=Path, help="with --threads: where the raw outputs go")
    args = parser.parse_args()
    if args.threads:
        run_all(args.out, args.threads)
        return 0
    write_versions()
    with tempfile.TemporaryDirectory() as tmp:
        runs = {n: Path(tmp) / f"threads{n}" for n in (1, 2)}
        for threads, out in runs.items():
            command = [sys.executable, __file__, "--threads", str(threads), "--out", str(out)]
            subprocess.run(command, check=True)
        write_case_documents(runs[1], runs[2])
    return 0


if __name__ == "__main__":
    sys.exit(main())
