"""Builds veRL 0.9.1 reference data for multi-turn response masks with holes.

Run with the veRL virtualenv (``bash bench/setup_verl_venv.sh`` creates it)::

    .venv-verl/bin/python tests/algorithms/loss_mask_reference/make_verl_reference.py

One seeded batch of 6 responses (width 12, right-padded) whose ``response_mask`` has holes: runs
of 1s (tokens the policy sampled) between runs of 0s (environment observation tokens), one row
without holes. Each turn's reward sits on its last sampled token (``turn_ends``), the score on
the last sampled token of the response, as rlfleet places them; values and log-probabilities
are random on every position (holes and padding too), so a function that reads a masked-out
position shows it. Every case calls veRL's own functions and writes ``cases/verl_NAME.safetensors``
(inputs and outputs) and ``cases/verl_NAME.json`` (the function, its arguments and the variation
between 1 and 2 torch threads):

- ``verl_gae_*``: ``core_algos.compute_gae_advantage_return`` (whitened advantages, returns) on
  rewards with the KL penalty applied as ``ray_trainer.apply_kl_penalty`` does it
  (``token_level_scores - beta * kl_penalty(old, ref) * response_mask``; ``ray_trainer`` does not
  import without veRL's full dependency set, so this script makes those two calls; its
  ``current_kl`` metric is stored too).
- ``verl_reinforce_pp_*``: ``compute_reinforce_plus_plus_outcome_advantage`` on the same rewards.
- ``verl_grpo_holes``: ``compute_grpo_outcome_advantage`` (3 groups of 2).
- ``verl_agg_*``: ``agg_loss`` for each ``loss_agg_mode`` (token-mean, seq-mean-token-sum,
  seq-mean-token-mean, seq-mean-token-sum-norm) on a random loss matrix, with one row masked
  entirely (veRL leaves such rows out of the sequence means); the loss and its gradient.
- ``verl_policy_loss_*``: ``compute_policy_loss_vanilla`` (token-mean and seq-mean-token-mean)
  with the clip 0.2 and veRL's default dual clip 3.0 (no ratio here reaches it:
  ``pg_clipfrac_lower`` is 0, stored); the loss, its gradient w.r.t. ``log_prob``, the clip
  fraction and ``ppo_kl``.
- ``verl_value_loss``: ``compute_value_loss`` (token-mean, ``cliprange_value`` 0.2): the loss, its
  gradient w.r.t. ``vpreds`` and the clip fraction.
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
MASK_ROWS = [
    "111000111100",
    "110011000111",
    "111110000000",
    "101010100000",
    "111100001000",
    "110001111110",
]
"""1: a sampled token, 0: an environment token (inside the response) or padding (after it)."""
RESPONSE_LENGTHS = [10, 12, 5, 7, 9, 11]
GROUPS = [0, 0, 1, 1, 2, 2]
SCORES = [1.0, 0.0, 0.5, -1.0, 2.0, 0.25]
KL_BETA = 0.05
AGG_MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
EMPTY_ROW = 3
"""The row the aggregation cases mask entirely."""

CASES: dict[str, dict[str, Any]] = {
    "verl_gae_holes_gamma1_lam0.95": {"kind": "gae", "gamma": 1.0, "lam": 0.95},
    "verl_gae_holes_gamma0.9_lam0.8": {"kind": "gae", "gamma": 0.9, "lam": 0.8},
    "verl_reinforce_pp_holes_gamma1": {"kind": "reinforce_pp", "gamma": 1.0},
    "verl_reinforce_pp_holes_gamma0.9": {"kind": "reinforce_pp", "gamma": 0.9},
    "verl_grpo_holes": {"kind": "grpo"},
    **{f"verl_agg_{mode}": {"kind": "agg", "loss_agg_mode": mode} for mode in AGG_MODES},
    "verl_policy_loss_token-mean": {"kind": "policy", "loss_agg_mode": "token-mean"},
    "verl_policy_loss_seq-mean-token-mean": {
        "kind": "policy",
        "loss_agg_mode": "seq-mean-token-mean",
    },
    "verl_value_loss": {"kind": "value", "cliprange_value": 0.2},
}


def turn_ends(mask_row: str) -> list[int]:
    """The last sampled token of each run of 1s."""
    return [
        i
        for i, c in enumerate(mask_row)
        if c == "1" and (i + 1 == len(mask_row) or mask_row[i + 1] == "0")
    ]


def make_batch() -> dict[str, torch.Tensor]:
    """The holey masks, turn rewards on turn ends, the score on the last sampled token, random
    log-probabilities, values and a second policy's log-probabilities."""
    rng = np.random.default_rng(2027)
    mask = torch.tensor([[float(c) for c in row] for row in MASK_ROWS])
    batch_size, width = mask.shape
    turn_rewards = torch.zeros(batch_size, width)
    scores = torch.zeros(batch_size, width)
    for row, pattern in enumerate(MASK_ROWS):
        ends = turn_ends(pattern)
        for end in ends[:-1]:
            turn_rewards[row, end] = float(rng.normal(0.0, 0.5))
        scores[row, ends[-1]] = SCORES[row]
    normal = lambda loc, scale: torch.tensor(  # noqa: E731
        rng.normal(loc, scale, size=(batch_size, width)), dtype=torch.float32
    )
    old = normal(-2.0, 0.8)
    return {
        "response_mask": mask,
        "lengths": torch.tensor(RESPONSE_LENGTHS),
        "scores": torch.tensor(SCORES),
        "turn_rewards": turn_rewards,
        "token_level_scores": scores + turn_rewards,
        "old_log_prob": old,
        "ref_log_prob": old + normal(0.0, 0.3),
        "log_prob": old + normal(0.0, 0.25),
        "values": normal(0.3, 0.6),
        "vpreds": normal(0.3, 0.6),
        "loss_mat": normal(0.0, 1.0),
        "group": torch.tensor(GROUPS),
    }


def kl_penalized(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``ray_trainer.apply_kl_penalty`` with a fixed controller (kl_penalty ``kl``)."""
    from verl.trainer.ppo import core_algos
    from verl.utils.torch_functional import masked_mean

    mask = batch["response_mask"]
    kld = core_algos.kl_penalty(batch["old_log_prob"], batch["ref_log_prob"], kl_penalty="kl")
    kld = kld * mask
    current_kl = torch.mean(masked_mean(kld, mask=mask, axis=-1), dim=0)
    rewards = batch["token_level_scores"] - KL_BETA * kld
    return {"token_level_rewards": rewards, "current_kl": current_kl.reshape(1)}


def advantage_case(case: dict[str, Any], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from verl.trainer.config import AlgoConfig
    from verl.trainer.ppo import core_algos

    penalized = kl_penalized(batch)
    rewards, mask = penalized["token_level_rewards"], batch["response_mask"]
    if case["kind"] == "gae":
        advantages, returns = core_algos.compute_gae_advantage_return(
            rewards.clone(), batch["values"], mask, case["gamma"], case["lam"]
        )
    elif case["kind"] == "reinforce_pp":
        advantages, returns = core_algos.compute_reinforce_plus_plus_outcome_advantage(
            rewards.clone(), mask, config=AlgoConfig(gamma=case["gamma"])
        )
    else:
        index = np.array([f"uid{g}" for g in GROUPS], dtype=object)
        advantages, returns = core_algos.compute_grpo_outcome_advantage(
            batch["token_level_scores"].clone(), mask, index
        )
    return penalized | {"advantages": advantages, "returns": returns}


def agg_case(case: dict[str, Any], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from verl.trainer.ppo import core_algos

    mask = batch["response_mask"].clone()
    mask[EMPTY_ROW] = 0.0
    loss_mat = batch["loss_mat"].clone().requires_grad_(True)
    loss = core_algos.agg_loss(loss_mat, mask, case["loss_agg_mode"])
    loss.backward()
    return {"agg_mask": mask, "loss": loss.detach().reshape(1), "grad_loss_mat": loss_mat.grad}


def policy_case(case: dict[str, Any], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from omegaconf import OmegaConf
    from verl.trainer.ppo import core_algos

    advantages = advantage_case(CASES["verl_gae_holes_gamma1_lam0.95"], batch)["advantages"]
    config = OmegaConf.create(
        {
            "clip_ratio": 0.2,
            "clip_ratio_low": None,
            "clip_ratio_high": None,
            "clip_ratio_c": 3.0,
            "global_batch_info": {},
        }
    )
    log_prob = batch["log_prob"].clone().requires_grad_(True)
    loss, metrics = core_algos.compute_policy_loss_vanilla(
        batch["old_log_prob"],
        log_prob,
        advantages,
        batch["response_mask"],
        loss_agg_mode=case["loss_agg_mode"],
        config=config,
    )
    loss.backward()
    assert metrics["actor/pg_clipfrac_lower"] == 0.0, "the dual clip acted"
    return {
        "advantages": advantages,
        "loss": loss.detach().reshape(1),
        "grad_log_prob": log_prob.grad,
        "pg_clipfrac": torch.tensor([metrics["actor/pg_clipfrac"]]),
        "ppo_kl": torch.tensor([metrics["actor/ppo_kl"]]),
        "pg_clipfrac_lower": torch.tensor([metrics["actor/pg_clipfrac_lower"]]),
    }


def value_case(case: dict[str, Any], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from verl.trainer.ppo import core_algos

    returns = advantage_case(CASES["verl_gae_holes_gamma1_lam0.95"], batch)["returns"]
    vpreds = batch["vpreds"].clone().requires_grad_(True)
    loss, clipfrac = core_algos.compute_value_loss(
        vpreds, returns, batch["values"], batch["response_mask"], case["cliprange_value"]
    )
    loss.backward()
    return {
        "returns": returns,
        "loss": loss.detach().reshape(1),
        "grad_vpreds": vpreds.grad,
        "vf_clipfrac": clipfrac.detach().reshape(1),
    }


RUNNERS = {
    "gae": advantage_case,
    "reinforce_pp": advantage_case,
    "grpo": advantage_case,
    "agg": agg_case,
    "policy": policy_case,
    "value": value_case,
}
FUNCTIONS = {
    "gae": "compute_gae_advantage_return",
    "reinforce_pp": "compute_reinforce_plus_plus_outcome_advantage",
    "grpo": "compute_grpo_outcome_advantage",
    "agg": "agg_loss",
    "policy": "compute_policy_loss_vanilla",
    "value": "compute_value_loss",
}


def run_case(name: str) -> dict[str, torch.Tensor]:
    case = CASES[name]
    batch = make_batch()
    return batch | RUNNERS[case["kind"]](case, batch)


def run_all(out_dir: Path, threads: int) -> None:
    from safetensors.torch import save_file

    torch.set_num_threads(threads)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in CASES:
        tensors = {k: v.detach().clone().contiguous() for k, v in run_case(name).items()}
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
            "function": f"verl.trainer.ppo.core_algos.{FUNCTIONS[case['kind']]}",
            "case": case,
            "kl_in_reward": {"kl_penalty": "kl", "beta": KL_BETA},
            "mask_rows": MASK_ROWS,
            "empty_row_in_agg": EMPTY_ROW,
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
