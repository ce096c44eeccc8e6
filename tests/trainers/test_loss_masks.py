"""Multi-turn loss masks in the trainers: environment tokens are context only.

The pieces are checked against veRL 0.9.1 and TRL 1.16 in tests/algorithms/test_loss_mask_parity.py;
here a whole step of each trainer is checked against those pieces composed by hand on a plain
forward over every response token (the LM and value heads on all of them), so the step's heads
skipping the environment tokens, its KL on mask-1 tokens, its turn rewards, veRL's GAE through the
holes and its mask-1-only losses and stats are each what the peers compute. Tolerance: float32
rounding between a packed forward over fewer rows and the full one (measured here: logprobs and
entropies bit for bit, values within 1.2e-7), ``rel=1e-5, abs=1e-6`` on the stats.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from support.batches import ppo_step_batch
from transformers import AutoModelForCausalLM

from rlfleet.algorithms.advantages import ADVANTAGE_ESTIMATORS, AdvantageConfig
from rlfleet.algorithms.grpo import CriticFreeLossConfig, critic_free_loss
from rlfleet.algorithms.kl import KL_PENALTIES
from rlfleet.algorithms.masked import masked_mean
from rlfleet.algorithms.ppo import ppo_advantages, ppo_loss
from rlfleet.algorithms.rewards import per_token_rewards
from rlfleet.common.config import CriticFreeConfig, PPOConfig
from rlfleet.trainers.critic_free import CriticFreeTrainer
from rlfleet.trainers.forward import PackedRows, ResponseBatch, response_forward
from rlfleet.trainers.ppo import PPOTrainer, loss_config
from rlfleet.trainers.value_head import AutoModelForCausalLMWithValueHead

BATCH = 4
STATS = {"rel": 1e-5, "abs": 1e-6}
HOLES = [(2, 4), (1, 3), (3, 6), (2, 5)]
"""Per sample, the response positions ``[start, stop)`` the environment wrote."""


def holey_batch(seed: int = 0) -> dict[str, list[torch.Tensor]]:
    """Queries, responses (7..10 tokens), scores, loss masks with one hole each and a turn
    reward on the first turn's last token."""
    queries, responses, scores = ppo_step_batch(
        seed, BATCH, vocab=500, response_lengths=lambda i: 7 + i
    )
    masks, rewards = [], []
    for response, (start, stop) in zip(responses, HOLES, strict=True):
        mask = torch.ones(len(response), dtype=torch.long)
        mask[start:stop] = 0
        turn = torch.zeros(len(response))
        turn[start - 1] = 0.3 + 0.1 * start
        masks.append(mask)
        rewards.append(turn)
    return {
        "queries": queries,
        "responses": responses,
        "scores": scores,
        "loss_masks": masks,
        "token_rewards": rewards,
    }


def lm_head_rows(model: torch.nn.Module, batch: ResponseBatch) -> tuple[object, int]:
    """The forward's outputs and how many rows its LM head ran on."""
    rows = []
    head = model.lm_head if hasattr(model, "lm_head") else model.get_output_embeddings()
    hook = head.register_forward_hook(lambda module, args, out: rows.append(args[0].shape[0]))
    try:
        with torch.no_grad():
            outputs = response_forward(
                model, PackedRows.build(batch, range(BATCH)), with_values=True, with_entropy=True
            )
    finally:
        hook.remove()
    return outputs, sum(rows)


def test_the_heads_run_on_sampled_tokens_only_and_agree_with_the_full_forward(tiny_model_dir):
    torch.manual_seed(0)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_model_dir).eval()
    inputs = holey_batch()
    full = ResponseBatch.build(inputs["queries"], inputs["responses"], None)
    holey = ResponseBatch.build(inputs["queries"], inputs["responses"], None, inputs["loss_masks"])
    expected, full_rows = lm_head_rows(model, full)
    actual, rows = lm_head_rows(model, holey)
    sampled = holey.mask.bool()
    assert rows == int(holey.mask.sum()) < full_rows == int(full.mask.sum())
    for name in ("logprobs", "values", "entropy"):
        got, want = getattr(actual, name), getattr(expected, name)
        torch.testing.assert_close(got[sampled], want[sampled], rtol=1e-5, atol=1e-6)
        assert not got[~sampled].any(), name  # nothing computed on environment tokens


def full_forward(model: torch.nn.Module, inputs: dict) -> tuple[ResponseBatch, object]:
    """Every response token's logprob, value and entropy (no mask), and the loss masks."""
    batch = ResponseBatch.build(inputs["queries"], inputs["responses"], None)
    with torch.no_grad():
        outputs = response_forward(
            model,
            PackedRows.build(batch, range(BATCH)),
            with_values=isinstance(model, AutoModelForCausalLMWithValueHead),
            with_entropy=True,
        )
    mask = ResponseBatch.build(inputs["queries"], inputs["responses"], inputs["loss_masks"]).mask
    return mask, outputs


def padded(rows: list[torch.Tensor]) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)


def test_a_ppo_step_with_holes_computes_as_verl(tiny_model_dir: Path) -> None:
    """One minibatch, one epoch: its stats are the loss at the rollout's weights, which the
    veRL pipeline gives from the full forward: KL on mask-1 tokens, the score on the last one,
    turn rewards, GAE skipping the holes, whitening and losses over mask-1 tokens."""
    torch.manual_seed(0)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_model_dir)
    config = PPOConfig(batch_size=BATCH, mini_batch_size=BATCH, ppo_epochs=1, init_kl_coef=0.1)
    trainer = PPOTrainer(config, model)
    inputs = holey_batch()
    mask, own = full_forward(model.eval(), inputs)
    _, ref = full_forward(trainer.ref_model.eval(), inputs)
    kl = KL_PENALTIES["kl"](own.logprobs, ref.logprobs) * mask
    scores = torch.stack(inputs["scores"])
    rewards, _ = per_token_rewards(scores, kl, mask, 0.1, padded(inputs["token_rewards"]))
    advantage_config = AdvantageConfig(gamma=config.gamma, lam=config.lam)
    values, advantages, returns = ppo_advantages(
        rewards, own.values, mask, advantage_config, estimator=ADVANTAGE_ESTIMATORS["masked_gae"]
    )
    expected = ppo_loss(
        logprobs=own.logprobs,
        vpreds=own.values,
        entropy=own.entropy,
        old_logprobs=own.logprobs,
        old_values=values,
        advantages=advantages,
        returns=returns,
        mask=mask,
        config=loss_config(config),
    ).stats

    stats = trainer.step(
        inputs["queries"],
        inputs["responses"],
        inputs["scores"],
        **{k: inputs[k] for k in ("loss_masks", "token_rewards")},
    )
    for key in ("loss/policy", "loss/value", "loss/total", "policy/entropy", "val/vpred",
                "val/error", "returns/mean", "val/mean", "policy/advantages_mean"):  # fmt: skip
        assert stats[f"ppo/{key}"] == pytest.approx(float(expected[key]), **STATS), key
    assert stats["objective/kl"] == pytest.approx(float(kl.sum(-1).mean()), **STATS)
    assert not stats["objective/logprobs"][~mask.bool().numpy()].any()


def test_trl_response_masks_and_loss_masks_are_different_modes(tiny_model_dir: Path) -> None:
    """The same holes as TRL's ``response_masks`` keep TRL's GAE (through the holes) and the
    heads on every token; as ``loss_masks`` veRL's. Both at once are refused."""
    inputs = holey_batch()
    results = {}
    for argument in ("response_masks", "loss_masks"):
        torch.manual_seed(0)
        model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_model_dir)
        trainer = PPOTrainer(PPOConfig(batch_size=BATCH, mini_batch_size=BATCH), model)
        results[argument] = trainer.step(
            inputs["queries"], inputs["responses"], inputs["scores"],
            **{argument: inputs["loss_masks"]},
        )  # fmt: skip
    assert results["response_masks"]["ppo/loss/value"] != pytest.approx(
        results["loss_masks"]["ppo/loss/value"], **STATS
    )
    with pytest.raises(ValueError, match="not both"):
        trainer.step(
            inputs["queries"], inputs["responses"], inputs["scores"],
            response_masks=inputs["loss_masks"], loss_masks=inputs["loss_masks"],
        )  # fmt: skip


def test_loss_masks_of_all_ones_train_as_none(tiny_model_dir: Path) -> None:
    """Without holes veRL's GAE is TRL's and the heads run everywhere: the same step."""
    inputs = holey_batch()
    ones = [torch.ones_like(mask) for mask in inputs["loss_masks"]]
    results = []
    for masks in (None, ones):
        torch.manual_seed(0)
        model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_model_dir)
        trainer = PPOTrainer(PPOConfig(batch_size=BATCH, mini_batch_size=2), model)
        stats = trainer.step(
            inputs["queries"], inputs["responses"], inputs["scores"], loss_masks=masks
        )
        results.append((stats, dict(model.named_parameters())))
    for key, value in results[0][0].items():
        if not key.startswith("time/"):
            assert results[1][0][key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    for name, parameter in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], parameter, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dropped", [False, True], ids=["all-rows", "a-dropped-row"])
@pytest.mark.parametrize("loss_type", ["grpo", "dapo"])
def test_a_grpo_step_with_holes_computes_as_trl_with_a_tool_mask(
    tiny_model_dir: Path, loss_type: str, dropped: bool
) -> None:
    """One minibatch: the loss, KL, entropy and clip metrics over mask-1 tokens, the sequence
    return the score plus the turn rewards, lengths counting sampled tokens (TRL's). A row
    whose mask is 0 everywhere (a dropped agent trajectory) is in no token statistic."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    config = CriticFreeConfig(
        algorithm="grpo", batch_size=BATCH, beta=0.04, loss_type=loss_type, tis_cap=None,
        max_completion_length=16,
    )  # fmt: skip
    trainer = CriticFreeTrainer(config, model)
    inputs = holey_batch()
    if dropped:
        inputs["loss_masks"][0] = torch.zeros_like(inputs["loss_masks"][0])
        inputs["token_rewards"][0] = torch.zeros_like(inputs["token_rewards"][0])
    groups = [0, 0, 1, 1]
    mask, own = full_forward(model.eval(), inputs)
    _, ref = full_forward(trainer.ref_model.eval(), inputs)
    scores = torch.stack(inputs["scores"])
    turn = padded(inputs["token_rewards"])
    rewards, _ = per_token_rewards(scores, torch.zeros(mask.shape), mask, 0.0, turn)
    advantages, _ = ADVANTAGE_ESTIMATORS["grpo"](
        rewards, mask, None, torch.tensor(groups), AdvantageConfig()
    )
    loss_settings = CriticFreeLossConfig(
        loss_type=loss_type, beta=0.04, max_completion_length=16, steps_per_generation=1
    )
    expected = critic_free_loss(
        own.logprobs, own.logprobs, ref.logprobs, advantages, mask, loss_settings,
        num_items_in_batch=mask.sum(),
    )  # fmt: skip

    stats = trainer.step(
        inputs["queries"], inputs["responses"], inputs["scores"], groups,
        loss_masks=inputs["loss_masks"], token_rewards=inputs["token_rewards"],
    )  # fmt: skip
    assert stats["loss"] == pytest.approx(float(expected.loss), **STATS)
    for key, value in expected.metrics.items():
        assert stats[key] == pytest.approx(float(value), nan_ok=True, **STATS), key
    assert stats["entropy"] == pytest.approx(float(masked_mean(own.entropy, mask)), **STATS)
    assert stats["completions/mean_length"] == float(mask.sum(-1).float().mean())
    assert stats["reward/mean"] == pytest.approx(float((scores + turn.sum(-1)).mean()), **STATS)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"loss_masks": "float"}, r"loss_masks\[0\] must be integers"),
        ({"loss_masks": "twos"}, r"loss_masks\[0\] must hold 0s and 1s"),
        ({"loss_masks": "all_zeros"}, r"loss_masks are 0 everywhere"),
        ({"token_rewards": "in_hole"}, r"token_rewards\[0\] is not 0 on a token"),
        ({"token_rewards": "short"}, r"token_rewards\[0\] must be floats of the shape"),
    ],
)
def test_bad_loss_masks_and_token_rewards_are_refused(tiny_model_dir, change, message):
    inputs = holey_batch()
    masks, rewards = inputs["loss_masks"], inputs["token_rewards"]
    bad = {
        "float": [masks[0].float(), *masks[1:]],
        "twos": [masks[0] * 2, *masks[1:]],
        "all_zeros": [torch.zeros_like(mask) for mask in masks],
        "in_hole": [rewards[0] + (1 - masks[0]), *rewards[1:]],
        "short": [rewards[0][:-1], *rewards[1:]],
    }
    arguments = {"loss_masks": masks, "token_rewards": rewards}
    arguments |= {name: bad[kind] for name, kind in change.items()}
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trainer = CriticFreeTrainer(CriticFreeConfig(batch_size=BATCH), copy.deepcopy(model))
    with pytest.raises(ValueError, match=message):
        trainer.step(
            inputs["queries"], inputs["responses"], inputs["scores"], [0, 0, 1, 1], **arguments
        )
