"""The trainers with an off-policy correction (``rollout_correction``, algorithms/corrections.py):
what a dropped sequence does to the update, and the ``rollout/correction/*`` stats."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from support.batches import ppo_step_batch
from transformers import AutoModelForCausalLM

from rlfleet.algorithms.corrections import mismatch_metrics
from rlfleet.common.config import CriticFreeConfig, PPOConfig
from rlfleet.trainers.critic_free import CriticFreeTrainer
from rlfleet.trainers.ppo import PPOTrainer
from rlfleet.trainers.value_head import AutoModelForCausalLMWithValueHead

BATCH = 8
GROUPS = [i // 4 for i in range(BATCH)]
REJECTED = 2
"""The row whose behaviour logprobs (-60 a token) put its sequence ratio out of any bounds."""
WIDE = {"mode": "seq_mis", "low": 0.01, "high": 100.0, "aggregate": "geometric"}
"""Bounds the tiny model's own rows (uniform-ish, logprob near -6.2, behaviour -6) stay within."""


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir: Path) -> AutoModelForCausalLM:
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir)


def make_batch(seed: int = 0):
    return ppo_step_batch(
        seed,
        BATCH,
        vocab=500,
        query_lengths=lambda i: 4 + i % 2,
        response_lengths=lambda i: 3 + i % 4,
    )


def behaviour_of(responses: list[torch.Tensor]) -> list[torch.Tensor]:
    return [torch.full(r.shape, -60.0 if i == REJECTED else -6.0) for i, r in enumerate(responses)]


def trained_weights(model, responses, correction: dict) -> dict[str, torch.Tensor]:
    queries, _, scores = make_batch()
    model = copy.deepcopy(model)
    config = CriticFreeConfig(batch_size=BATCH, learning_rate=1e-3, rollout_correction=correction)
    trainer = CriticFreeTrainer(config, model)
    trainer.step(queries, responses, scores, GROUPS, behaviour_logprobs=behaviour_of(responses))
    return {name: value.detach().clone() for name, value in model.state_dict().items()}


def test_a_sequence_seq_mis_rejects_contributes_nothing_to_the_update(tiny_model) -> None:
    """The rejected row's tokens leave the update unchanged (its score still counts in its
    group); token TIS, which only caps the row's weights, lets them change it."""
    _, responses, _ = make_batch()
    other = [r.clone() for r in responses]
    other[REJECTED] = (other[REJECTED] + 7) % 500
    masked_a = trained_weights(tiny_model, responses, WIDE)
    masked_b = trained_weights(tiny_model, other, WIDE)
    assert all(torch.equal(masked_a[name], masked_b[name]) for name in masked_a)
    capped = {"mode": "token_tis", "cap": 2.0}
    plain_a = trained_weights(tiny_model, responses, capped)
    plain_b = trained_weights(tiny_model, other, capped)
    assert not all(torch.equal(plain_a[name], plain_b[name]) for name in plain_a)


def test_critic_free_reports_the_mismatch_and_what_the_correction_dropped(tiny_model) -> None:
    queries, responses, scores = make_batch()
    config = CriticFreeConfig(batch_size=BATCH, rollout_correction=WIDE)
    trainer = CriticFreeTrainer(config, copy.deepcopy(tiny_model))
    stats = trainer.step(
        queries, responses, scores, GROUPS, behaviour_logprobs=behaviour_of(responses)
    )
    lengths = [len(r) for r in responses]
    assert stats["rollout/correction/masked_fraction"] == pytest.approx(
        lengths[REJECTED] / sum(lengths)
    )
    assert stats["rollout/correction/seq_masked_fraction"] == pytest.approx(1 / BATCH)
    assert stats["rollout/correction/k3_kl"] > 0
    assert stats["rollout/tis_capped_fraction"] == 0.0  # no token TIS: nothing capped


def test_the_default_tis_cap_reports_its_correction_stats_too(tiny_model) -> None:
    """``tis_cap`` (2.0 by default) is token TIS: the legacy stats as before, and the new ones
    (the mismatch metrics of the learner's old logprobs against the behaviour's)."""
    queries, responses, scores = make_batch()
    trainer = CriticFreeTrainer(CriticFreeConfig(batch_size=BATCH), copy.deepcopy(tiny_model))
    behaviour = [torch.full(r.shape, -6.0) for r in responses]
    stats = trainer.step(queries, responses, scores, GROUPS, behaviour_logprobs=behaviour)
    assert stats["rollout/correction/masked_fraction"] == 0.0
    assert 0 < stats["rollout/correction/is_weight_mean"] <= 2.0
    assert "rollout/tis_capped_fraction" in stats and "rollout/logprob_diff_mean" in stats


@pytest.fixture()
def ppo_trainer(tiny_model_dir):
    def make(**kwargs) -> PPOTrainer:
        model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_model_dir)
        config = PPOConfig(batch_size=BATCH, mini_batch_size=2, ppo_epochs=1, **kwargs)
        return PPOTrainer(config, model)

    return make


def test_ppo_reports_k3_kl_as_the_mismatch_metrics_compute_it(ppo_trainer) -> None:
    queries, responses, scores = make_batch()
    trainer = ppo_trainer(rollout_correction={"mode": "icepop", "low": 0.5, "high": 2.0})
    behaviour = behaviour_of(responses)
    stats = trainer.step(queries, responses, scores, behaviour_logprobs=behaviour)
    old = torch.tensor(stats["objective/logprobs"])
    padded = torch.nn.utils.rnn.pad_sequence(behaviour, batch_first=True)
    mask = (padded != 0).float()
    expected = mismatch_metrics(old, padded, mask)["k3_kl"]
    assert stats["rollout/correction/k3_kl"] == pytest.approx(float(expected), rel=1e-5)
    assert stats["rollout/correction/masked_fraction"] >= 3 / sum(len(r) for r in responses)


def test_ppo_leaves_out_a_minibatch_the_correction_emptied(ppo_trainer) -> None:
    """Only row 2 in bounds (its geometric ratio is ``e^20``, the clamp's): the three minibatches
    without it are not trained on."""
    queries, responses, scores = make_batch()
    bounds = {"low": 1e8, "high": 1e9, "aggregate": "geometric"}
    trainer = ppo_trainer(rollout_correction={"mode": "seq_mis", **bounds})
    stats = trainer.step(queries, responses, scores, behaviour_logprobs=behaviour_of(responses))
    assert stats["rollout/correction/seq_masked_fraction"] == pytest.approx(7 / 8)
    assert len(stats["ppo/policy/ratio"]) == len(responses[REJECTED])


def test_ppo_refuses_a_batch_the_correction_rejected_entirely(ppo_trainer) -> None:
    queries, responses, scores = make_batch()
    trainer = ppo_trainer(rollout_correction={"mode": "seq_mis", "low": 1e30, "high": 1e31})
    with pytest.raises(ValueError, match="rollout_correction seq_mis .* dropped every sequence"):
        trainer.step(queries, responses, scores, behaviour_logprobs=behaviour_of(responses))
