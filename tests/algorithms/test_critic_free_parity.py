"""The critic-free algorithms against the peers' own numbers, one test per stored case.

``tests/algorithms/critic_free_reference/cases/`` holds what TRL 1.16.0 (``GRPOTrainer``,
``RLOOTrainer``) and veRL 0.9.1 (``core_algos``) computed on crafted batches; the scripts beside
them (``make_trl_reference.py``, ``make_verl_reference.py``) list every case and how it was made.

Tolerance: ``atol=1e-6, rtol=1e-5``, float32 rounding between two implementations of one formula.
Measured on the stored inputs: our float32 results against the same functions in float64 differ
by at most 1.7e-8 (3e-7 relative) for the losses and gradients and 2.6e-6 (6.7e-6 relative) for
advantages, the worst where a group's scores are nearly equal and dividing by its small std
magnifies rounding; ours on 1 and 2 threads are identical, the peers' too (except a 1.4e-9 change
in a parameter gradient not compared here). The largest difference from the peers seen is 2.4e-7
(RLOO with its KL in the reward, summed in another order); most cases agree bit for bit.
``test_the_tolerance_tells_neighbouring_formulas_apart`` checks the tolerance is far below what a
plausible slip changes (eps 1e-6 for 1e-4, the padded width for ``max_completion_length``).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlfleet.algorithms.advantages import ADVANTAGE_ESTIMATORS, AdvantageConfig
from rlfleet.algorithms.baselines import group_normalized_advantages, leave_one_out_advantages
from rlfleet.algorithms.grpo import CriticFreeLossConfig, critic_free_loss
from rlfleet.algorithms.kl import KL_PENALTIES
from rlfleet.algorithms.rewards import per_token_rewards

CASES = Path(__file__).resolve().parent / "critic_free_reference" / "cases"
TOLERANCE = {"atol": 1e-6, "rtol": 1e-5}
VERL_ESTIMATORS = {
    "compute_grpo_outcome_advantage": "grpo",
    "compute_rloo_outcome_advantage": "rloo",
    "compute_rloo_vectorized_outcome_advantage": "rloo",
    "compute_reinforce_plus_plus_outcome_advantage": "reinforce_pp",
    "compute_reinforce_plus_plus_baseline_outcome_advantage": "reinforce_pp_baseline",
}
VERL_KL_PENALTIES = {"kl": "kl", "low_var_kl": "k3"}
VERL_GRPO_EPS = 1e-6
"""veRL's ``compute_grpo_outcome_advantage`` default ``epsilon`` (TRL's is 1e-4)."""


def case_names(prefix: str) -> list[str]:
    return sorted(path.stem for path in CASES.glob(f"{prefix}*.json"))


def load_case(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    document = json.loads((CASES / f"{name}.json").read_text())
    return document, load_file(CASES / f"{name}.safetensors")


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, **TOLERANCE, check_dtype=False)


def trl_groups(document: dict) -> torch.Tensor:
    """TRL's RepeatSampler: each prompt's ``num_generations`` samples side by side."""
    return torch.arange(len(document["prompts"])).repeat_interleave(document["num_generations"])


def loss_config(document: dict) -> CriticFreeLossConfig:
    settings = document["effective_settings"]
    return CriticFreeLossConfig(
        loss_type=settings["loss_type"],
        epsilon=settings["epsilon_low"],
        epsilon_high=document["config"].get("epsilon_high"),
        beta=settings["beta"],
        importance_sampling_level=settings["importance_sampling_level"],
        use_bias_correction_kl=settings["use_bias_correction_kl"],
        max_completion_length=settings["max_completion_length"],
        gradient_accumulation_steps=settings["gradient_accumulation_steps"],
        steps_per_generation=settings["steps_per_generation"],
    )


def trl_loss(name: str, config: CriticFreeLossConfig | None = None):
    """Our loss on the case's inputs: (loss, gradient w.r.t. per_token_logps, metrics)."""
    document, tensors = load_case(name)
    logprobs = tensors["per_token_logps"].clone().requires_grad_(True)
    # Without stored old log-probabilities TRL used per_token_logps.detach() (num_iterations 1).
    old_logprobs = tensors.get("old_per_token_logps", logprobs.detach())
    output = critic_free_loss(
        logprobs,
        old_logprobs,
        tensors.get("ref_per_token_logps"),
        tensors["advantages"],
        tensors["completion_mask"],
        config or loss_config(document),
        num_items_in_batch=float(tensors["num_items_in_batch"]),
    )
    output.loss.backward()
    return output.loss.detach(), logprobs.grad, output.metrics


@pytest.mark.parametrize("name", case_names("trl_grpo_loss_"))
def test_loss_gradient_and_metrics_equal_trl_grpo_compute_loss(name):
    document, tensors = load_case(name)
    loss, gradient, metrics = trl_loss(name)
    assert_close(loss, tensors["loss"][0])
    assert_close(gradient, tensors["grad_per_token_logps"])
    # TRL's entropy comes from the forward pass; the trainer logs it, not the loss.
    expected = {k: v for k, v in document["metrics"].items() if k != "entropy"}
    assert set(metrics) == set(expected)
    for key, (value,) in expected.items():
        assert_close(metrics[key], torch.tensor(value))


def trl_scores(document: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """TRL's reward: the weighted sum of the reward functions' scores, NaN where unscorable."""
    weights = document["effective_settings"]["reward_weights"]
    names = document["effective_settings"]["reward_func_names"]
    columns = torch.stack([tensors[f"scores_{n}"] for n in names], dim=1)
    scores = (columns * torch.tensor(weights)).nansum(dim=1)
    if document["unscorable_sample"] is not None:
        scores[document["unscorable_sample"]] = torch.nan
    return scores


@pytest.mark.parametrize("name", case_names("trl_grpo_adv_"))
def test_grpo_advantages_equal_trl_grpo_trainer(name):
    document, tensors = load_case(name)
    scores, groups = trl_scores(document, tensors), trl_groups(document)
    scale_rewards = document["effective_settings"]["scale_rewards"]
    assert_close(group_normalized_advantages(scores, groups, scale_rewards), tensors["advantages"])

    mask = tensors["completion_mask"]
    rewards, _ = per_token_rewards(scores, torch.zeros(mask.shape), mask, kl_coef=0.0)
    config = AdvantageConfig(scale_rewards=scale_rewards)
    advantages, returns = ADVANTAGE_ESTIMATORS["grpo"](rewards, mask, None, groups, config)
    assert_close(advantages, tensors["advantages"].unsqueeze(1) * mask)
    assert torch.equal(returns, advantages)


@pytest.mark.parametrize("name", case_names("trl_rloo_adv_"))
def test_rloo_advantages_with_kl_in_the_reward_equal_trl_rloo_trainer(name):
    """TRL's RLOO reward ``r - beta * sum_t (logp_t - ref_logp_t)`` is ``per_token_rewards`` with
    the k1 penalty, which the estimator sums back over the tokens."""
    document, tensors = load_case(name)
    settings, mask = document["effective_settings"], tensors["completion_mask"]
    kl = torch.zeros(mask.shape)
    if settings["beta"]:
        reference = tensors["forward_ref_per_token_logps"]
        kl = KL_PENALTIES["kl"](tensors["forward_per_token_logps"], reference)
    rewards, _ = per_token_rewards(tensors["scores_correct"], kl * mask, mask, settings["beta"])
    config = AdvantageConfig(normalize_advantages=settings["normalize_advantages"])
    advantages, _ = ADVANTAGE_ESTIMATORS["rloo"](rewards, mask, None, trl_groups(document), config)
    assert_close(advantages, tensors["advantages"].unsqueeze(1) * mask)


def verl_rewards(document: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """veRL's ``token_level_rewards``: the scores, minus ``beta * KL`` per token when the case
    puts its KL in the reward."""
    mask = tensors["response_mask"]
    if document["kl_in_reward"] is None:
        return tensors["token_level_scores"]
    penalty = KL_PENALTIES[VERL_KL_PENALTIES[document["kl_in_reward"]["kl_penalty"]]]
    kl = penalty(tensors["old_log_prob"], tensors["ref_log_prob"]) * mask
    scores = tensors["token_level_scores"].sum(-1)
    rewards, _ = per_token_rewards(scores, kl, mask, document["kl_in_reward"]["beta"])
    return rewards


@pytest.mark.parametrize("name", case_names("verl_"))
def test_advantages_and_returns_equal_verl_core_algos(name):
    document, tensors = load_case(name)
    rewards = verl_rewards(document, tensors)
    assert_close(rewards, tensors["token_level_rewards"])
    estimator = VERL_ESTIMATORS[document["function"].rsplit(".", 1)[1]]
    norm_by_std = document["kwargs"].get("norm_adv_by_std_in_grpo", True)
    config = AdvantageConfig(
        gamma=(document["algo_config"] or {}).get("gamma", 1.0),
        scale_rewards="group" if norm_by_std else "none",
        std_eps=VERL_GRPO_EPS,
    )
    advantages, returns = ADVANTAGE_ESTIMATORS[estimator](
        tensors["token_level_rewards"], tensors["response_mask"], None, tensors["group"], config
    )
    assert_close(advantages, tensors["advantages"])
    assert_close(returns, tensors["returns"])


def test_every_stored_case_is_checked():
    families = ("trl_grpo_loss_", "trl_grpo_adv_", "trl_rloo_adv_", "verl_")
    checked = sum(len(case_names(prefix)) for prefix in families)
    assert checked == len(list(CASES.glob("*.json"))) == 84


def differs(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    return not torch.allclose(actual.double(), expected.double(), **TOLERANCE)


def test_the_tolerance_tells_neighbouring_formulas_apart():
    document, tensors = load_case("trl_grpo_adv_scale_group")
    scores, groups = trl_scores(document, tensors), trl_groups(document)
    expected = tensors["advantages"]
    assert differs(group_normalized_advantages(scores, groups, std_eps=1e-6), expected)
    assert differs(group_normalized_advantages(scores, groups, "batch"), expected)
    assert differs(leave_one_out_advantages(scores, groups, normalize_advantages=True), expected)

    name = "trl_grpo_loss_dr_grpo_beta0.04_eps0.2_token_iter2"
    document, tensors = load_case(name)
    config = loss_config(document)
    padded_width = tensors["completion_mask"].shape[1]
    assert padded_width != config.max_completion_length
    loss, gradient, _ = trl_loss(name, replace(config, max_completion_length=padded_width))
    assert differs(loss, tensors["loss"][0]) and differs(gradient, tensors["grad_per_token_logps"])
    _, gradient, _ = trl_loss(name, replace(config, use_bias_correction_kl=False))
    assert differs(gradient, tensors["grad_per_token_logps"])
