"""Multi-turn loss masks with holes, against the peers' own numbers, one test per stored case.

``tests/algorithms/loss_mask_reference/cases/`` holds what veRL 0.9.1 (``core_algos``) and TRL 1.16
(``GRPOTrainer`` with a tool mask) computed on response masks with holes (environment tokens
between the policy's turns); the scripts beside them (``make_verl_reference.py``,
``make_trl_reference.py``) list every case and how it was made.

Tolerance: ``atol=1e-6, rtol=1e-5``, the one ``test_critic_free_parity.py`` uses, float32
rounding between two implementations of one formula. Measured on these cases: the peers' results
on 1 and 2 torch threads are identical (``thread_variation`` 0 in every JSON); ours differ from
theirs by at most 6e-8 (veRL's GRPO advantages: its scores summed over the tokens in another
order), every other case agrees bit for bit.
``test_the_tolerance_tells_the_two_gae_semantics_apart`` shows TRL's GAE (zeros in the holes)
is far outside it on these masks.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlfleet.algorithms.advantages import ADVANTAGE_ESTIMATORS, AdvantageConfig, gae
from rlfleet.algorithms.grpo import CriticFreeLossConfig, critic_free_loss
from rlfleet.algorithms.kl import KL_PENALTIES
from rlfleet.algorithms.losses import (
    LOSS_AGGREGATIONS,
    LossConfig,
    clipped_policy_loss,
    clipped_value_loss,
)
from rlfleet.algorithms.masked import masked_mean, masked_whiten
from rlfleet.algorithms.ppo import ppo_advantages
from rlfleet.algorithms.rewards import per_token_rewards

CASES = Path(__file__).resolve().parent / "loss_mask_reference" / "cases"
TOLERANCE = {"atol": 1e-6, "rtol": 1e-5}
VERL_GRPO_EPS = 1e-6


def case_names(prefix: str) -> list[str]:
    return sorted(path.stem for path in CASES.glob(f"{prefix}*.json"))


def load_case(name: str) -> tuple[dict, dict[str, torch.Tensor]]:
    document = json.loads((CASES / f"{name}.json").read_text())
    return document, load_file(CASES / f"{name}.safetensors")


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, **TOLERANCE, check_dtype=False)


def kl_penalized_rewards(document: dict, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """What the trainers compute: ``-beta * KL`` on the mask-1 tokens, the score on the last one,
    the turn rewards where they sit."""
    mask = tensors["response_mask"]
    kl = KL_PENALTIES["kl"](tensors["old_log_prob"], tensors["ref_log_prob"]) * mask
    beta = document["kl_in_reward"]["beta"]
    rewards, _ = per_token_rewards(tensors["scores"], kl, mask, beta, tensors["turn_rewards"])
    return rewards


@pytest.mark.parametrize("name", case_names("verl_gae_") + case_names("verl_reinforce_pp_"))
def test_kl_penalty_with_turn_rewards_equals_verl_apply_kl_penalty(name):
    document, tensors = load_case(name)
    assert_close(kl_penalized_rewards(document, tensors), tensors["token_level_rewards"])


@pytest.mark.parametrize("name", case_names("verl_gae_"))
def test_masked_gae_equals_verl_compute_gae_advantage_return(name):
    """The estimator on veRL's own inputs agrees on every position (values read nowhere in a
    hole), and PPO's advantages (masked values, whitened) on every mask-1 token."""
    document, tensors = load_case(name)
    mask, values = tensors["response_mask"], tensors["values"]
    rewards = tensors["token_level_rewards"]
    config = AdvantageConfig(gamma=document["case"]["gamma"], lam=document["case"]["lam"])
    advantages, returns = ADVANTAGE_ESTIMATORS["masked_gae"](rewards, mask, values, None, config)
    assert_close(masked_whiten(advantages, mask), tensors["advantages"])
    assert_close(returns, tensors["returns"])

    estimator = ADVANTAGE_ESTIMATORS["masked_gae"]
    _, advantages, returns = ppo_advantages(rewards, values, mask, config, estimator=estimator)
    sampled = mask.bool()
    assert_close(advantages[sampled], tensors["advantages"][sampled])
    assert_close(returns[sampled], tensors["returns"][sampled])


@pytest.mark.parametrize("name", case_names("verl_reinforce_pp_"))
def test_reinforce_pp_with_holes_equals_verl(name):
    document, tensors = load_case(name)
    config = AdvantageConfig(gamma=document["case"]["gamma"])
    advantages, returns = ADVANTAGE_ESTIMATORS["reinforce_pp"](
        tensors["token_level_rewards"], tensors["response_mask"], None, None, config
    )
    assert_close(advantages, tensors["advantages"])
    assert_close(returns, tensors["returns"])


def test_grpo_with_holes_equals_verl():
    """The sequence return is the score plus the turn rewards."""
    _, tensors = load_case("verl_grpo_holes")
    config = AdvantageConfig(std_eps=VERL_GRPO_EPS)
    mask = tensors["response_mask"]
    rewards, _ = per_token_rewards(
        tensors["scores"], torch.zeros(mask.shape), mask, 0.0, tensors["turn_rewards"]
    )
    advantages, _ = ADVANTAGE_ESTIMATORS["grpo"](rewards, mask, None, tensors["group"], config)
    assert_close(advantages, tensors["advantages"])


@pytest.mark.parametrize("name", case_names("verl_agg_"))
def test_loss_aggregations_equal_verl_agg_loss(name):
    document, tensors = load_case(name)
    losses = tensors["loss_mat"].clone().requires_grad_(True)
    loss = LOSS_AGGREGATIONS[document["case"]["loss_agg_mode"]](losses, tensors["agg_mask"])
    loss.backward()
    assert_close(loss.detach(), tensors["loss"][0])
    assert_close(losses.grad, tensors["grad_loss_mat"])


@pytest.mark.parametrize("name", case_names("verl_policy_loss_"))
def test_policy_loss_with_holes_equals_verl_compute_policy_loss_vanilla(name):
    document, tensors = load_case(name)
    mask = tensors["response_mask"]
    logprobs = tensors["log_prob"].clone().requires_grad_(True)
    config = LossConfig(cliprange=0.2, aggregation=document["case"]["loss_agg_mode"])
    output = clipped_policy_loss(
        logprobs, tensors["old_log_prob"], tensors["advantages"], mask, config
    )
    output.loss.backward()
    assert_close(output.loss.detach(), tensors["loss"][0])
    assert_close(logprobs.grad, tensors["grad_log_prob"])
    assert_close(output.clipfrac, tensors["pg_clipfrac"][0])
    # PPO's policy/policykl stat is veRL's ppo_kl.
    assert_close(
        masked_mean(tensors["old_log_prob"] - logprobs.detach(), mask), tensors["ppo_kl"][0]
    )
    assert tensors["pg_clipfrac_lower"][0] == 0.0 and 0.0 < output.clipfrac < 1.0


def test_value_loss_with_holes_equals_verl_compute_value_loss():
    _, tensors = load_case("verl_value_loss")
    vpreds = tensors["vpreds"].clone().requires_grad_(True)
    loss, clipfrac = clipped_value_loss(
        vpreds, tensors["values"], tensors["returns"], tensors["response_mask"], LossConfig()
    )
    loss.backward()
    assert_close(loss.detach(), tensors["loss"][0])
    assert_close(vpreds.grad, tensors["grad_vpreds"])
    assert_close(clipfrac, tensors["vf_clipfrac"][0])


def tool_loss_config(document: dict) -> CriticFreeLossConfig:
    settings = document["effective_settings"]
    return CriticFreeLossConfig(
        loss_type=settings["loss_type"],
        epsilon=settings["epsilon_low"],
        epsilon_high=settings["epsilon_high"],
        beta=settings["beta"],
        importance_sampling_level=settings["importance_sampling_level"],
        use_bias_correction_kl=settings["use_bias_correction_kl"],
        max_completion_length=settings["max_completion_length"],
        gradient_accumulation_steps=settings["gradient_accumulation_steps"],
        steps_per_generation=settings["steps_per_generation"],
    )


@pytest.mark.parametrize("name", case_names("trl_tool_grpo_loss_"))
def test_tool_masked_loss_equals_trl_grpo_compute_loss(name):
    """Our loss on TRL's completion mask times its tool mask: loss, gradient, metrics, and the
    tokens ``dapo`` normalises by."""
    document, tensors = load_case(name)
    mask = tensors["completion_mask"] * tensors["tool_mask"]
    assert (mask == 0).logical_and(tensors["completion_mask"] == 1).any()  # holes inside
    assert float(tensors["num_items_in_batch"]) == float(mask.sum())
    logprobs = tensors["per_token_logps"].clone().requires_grad_(True)
    output = critic_free_loss(
        logprobs,
        tensors["old_per_token_logps"],
        tensors.get("ref_per_token_logps"),
        tensors["advantages"],
        mask,
        tool_loss_config(document),
        num_items_in_batch=float(mask.sum()),
    )
    output.loss.backward()
    assert_close(output.loss.detach(), tensors["loss"][0])
    assert_close(logprobs.grad, tensors["grad_per_token_logps"])
    for key, value in output.metrics.items():
        assert_close(value, torch.tensor(document["metrics"][key][0]))


def test_every_stored_case_is_checked():
    families = (
        "verl_gae_",
        "verl_reinforce_pp_",
        "verl_grpo_",
        "verl_agg_",
        "verl_policy_loss_",
        "verl_value_loss",
        "trl_tool_grpo_loss_",
    )
    checked = sum(len(case_names(prefix)) for prefix in families)
    assert checked == len(list(CASES.glob("*.json"))) == 18


def test_the_tolerance_tells_the_two_gae_semantics_apart():
    """TRL's GAE runs through the holes (zero rewards and values there): on these masks its
    advantages are far from veRL's."""
    document, tensors = load_case("verl_gae_holes_gamma1_lam0.95")
    mask = tensors["response_mask"]
    config = AdvantageConfig(gamma=1.0, lam=0.95)
    _, advantages, _ = ppo_advantages(
        tensors["token_level_rewards"], tensors["values"], mask, config, estimator=gae
    )
    sampled = mask.bool()
    difference = (advantages[sampled] - tensors["advantages"][sampled]).abs().max()
    assert difference > 100 * TOLERANCE["atol"]
