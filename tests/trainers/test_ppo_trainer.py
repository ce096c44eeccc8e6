"""PPOTrainer: the TRL quickstart, generate, step's checks and stats, resumable state."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from support.batches import ppo_step_batch
from transformers import AutoTokenizer

from rlfleet.common.config import PPOConfig
from rlfleet.trainers.ppo import PPOTrainer
from rlfleet.trainers.trl_compat import TRLCompatMixin
from rlfleet.trainers.value_head import AutoModelForCausalLMWithValueHead

TRL_STAT_KEYS = {
    "objective/kl", "objective/kl_dist", "objective/logprobs", "objective/ref_logprobs",
    "objective/kl_coef", "objective/entropy", "ppo/mean_non_score_reward", "ppo/mean_scores",
    "ppo/std_scores", "tokens/queries_len_mean", "tokens/queries_len_std", "tokens/queries_dist",
    "tokens/responses_len_mean", "tokens/responses_len_std", "tokens/responses_dist",
    "ppo/loss/policy", "ppo/loss/value", "ppo/loss/total", "ppo/policy/entropy",
    "ppo/policy/approxkl", "ppo/policy/policykl", "ppo/policy/clipfrac", "ppo/policy/advantages",
    "ppo/policy/advantages_mean", "ppo/policy/ratio", "ppo/returns/mean", "ppo/returns/var",
    "ppo/val/vpred", "ppo/val/error", "ppo/val/clipfrac", "ppo/val/mean", "ppo/val/var",
    "ppo/val/var_explained", "ppo/learning_rate", "time/ppo/forward_pass",
    "time/ppo/compute_rewards", "time/ppo/compute_advantages", "time/ppo/optimize_step",
    "time/ppo/calc_stats", "time/ppo/total",
}  # fmt: skip

QUICKSTART = """
import sys
import torch
from transformers import AutoTokenizer, AutoModelForCausalLM
from rlfleet import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

model_dir, out_dir = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir)
ref_model = AutoModelForCausalLMWithValueHead.from_pretrained(model_dir)
tokenizer = AutoTokenizer.from_pretrained(model_dir)
tokenizer.pad_token = tokenizer.eos_token

ppo_config = {"mini_batch_size": 1, "batch_size": 1}
config = PPOConfig(**ppo_config)
ppo_trainer = PPOTrainer(config, model, ref_model, tokenizer)

query_txt = "This morning I went to the "
query_tensor = tokenizer.encode(query_txt, return_tensors="pt").to(model.pretrained_model.device)

generation_kwargs = {
    "min_length": -1,
    "top_k": 0.0,
    "top_p": 1.0,
    "do_sample": True,
    "pad_token_id": tokenizer.eos_token_id,
    "max_new_tokens": 20,
}
response_tensor = ppo_trainer.generate(
    [item for item in query_tensor], return_prompt=False, **generation_kwargs
)
response_txt = tokenizer.decode(response_tensor[0])

reward = [torch.tensor(1.0, device=model.pretrained_model.device)]

train_stats = ppo_trainer.step([query_tensor[0]], [response_tensor[0]], reward)
model.save_pretrained(out_dir)

plain = AutoModelForCausalLM.from_pretrained(out_dir)
reloaded = AutoModelForCausalLMWithValueHead.from_pretrained(out_dir)
policy = model.pretrained_model.state_dict()
assert all(torch.equal(t, policy[k]) for k, t in plain.state_dict().items())
assert torch.equal(reloaded.v_head.summary.weight, model.v_head.summary.weight)
assert torch.equal(reloaded.v_head.summary.bias, model.v_head.summary.bias)
print("QUICKSTART OK", train_stats["ppo/loss/total"], len(response_tensor[0]))
"""


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture()
def make_trainer(tiny_model_dir, tokenizer):
    def make(**ppo_kwargs) -> PPOTrainer:
        model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_model_dir)
        return PPOTrainer(PPOConfig(**ppo_kwargs), model, tokenizer=tokenizer)

    return make


def random_batch(size: int, seed: int = 0, response_lengths: tuple[int, int] = (1, 9)):
    """Queries of 1 to 6 tokens, responses of ``response_lengths``, ids below 500 (numpy)."""
    return ppo_step_batch(
        seed, size, rng="numpy", vocab=500, query_lengths=(1, 7), response_lengths=response_lengths
    )


def test_quickstart_runs_unchanged_but_for_the_import(tiny_model_dir, tmp_path):
    script = tmp_path / "quickstart.py"
    script.write_text(textwrap.dedent(QUICKSTART))
    result = subprocess.run(
        [sys.executable, str(script), str(tiny_model_dir), str(tmp_path / "saved")],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "QUICKSTART OK" in result.stdout


def test_generate_one_query_gives_a_2d_tensor_with_the_prompt(make_trainer):
    trainer = make_trainer(batch_size=1, mini_batch_size=1)
    query = torch.tensor([5, 6, 7])
    output = trainer.generate(query, max_new_tokens=4, do_sample=False)
    assert output.dim() == 2 and output.shape[0] == 1
    assert output[0, :3].tolist() == [5, 6, 7]
    response = trainer.generate(query, return_prompt=False, max_new_tokens=4, do_sample=False)
    assert torch.equal(response, output[:, 3:])
    with pytest.raises(ValueError, match="1-D"):
        trainer.generate(query.unsqueeze(0))


def test_generate_batches_with_left_padding_and_strips_the_prompt(make_trainer, tokenizer):
    trainer = make_trainer(batch_size=1, mini_batch_size=1)
    tokenizer.padding_side = "right"
    queries = [torch.tensor([5, 6, 7, 8, 9]), torch.tensor([11]), torch.tensor([12, 13])]
    kwargs = {"max_new_tokens": 5, "do_sample": False, "eos_token_id": None}
    with_prompt = trainer.generate(queries, batch_size=2, **kwargs)
    responses = trainer.generate(queries, batch_size=2, return_prompt=False, **kwargs)
    assert tokenizer.padding_side == "right"
    for query, full, response in zip(queries, with_prompt, responses, strict=True):
        assert full.dim() == 1 and len(response) == 5
        assert torch.equal(full, torch.cat([query, response]))
        alone = trainer.generate(query, return_prompt=False, **kwargs)[0]
        assert torch.equal(response, alone)


def test_generate_cuts_each_response_after_its_first_eos(make_trainer, tokenizer):
    trainer = make_trainer(batch_size=1, mini_batch_size=1)
    queries = [torch.tensor([5, 6, 7]), torch.tensor([21, 22])]
    kwargs = {"max_new_tokens": 8, "do_sample": True, "top_k": 0, "eos_token_id": None}
    torch.manual_seed(0)
    uncut = trainer.generate(queries, return_prompt=False, **kwargs)
    first = uncut[0].tolist()
    position = next(i for i in range(1, len(first)) if first[i] not in first[:i])
    eos = first[position]
    trainer.tokenizer = copy.deepcopy(tokenizer)
    trainer.tokenizer.eos_token = tokenizer.convert_ids_to_tokens(eos)
    assert trainer.tokenizer.eos_token_id == eos
    torch.manual_seed(0)
    cut = trainer.generate(queries, return_prompt=False, **kwargs)
    assert cut[0].tolist() == first[: position + 1]
    for response, full in zip(cut, uncut, strict=True):
        ids = full.tolist()
        end = ids.index(eos) + 1 if eos in ids else len(ids)
        assert response.tolist() == ids[:end]


def test_step_returns_trl_stats_as_floats_and_arrays(make_trainer):
    trainer = make_trainer(batch_size=4, mini_batch_size=2, ppo_epochs=2)
    queries, responses, scores = random_batch(4)
    stats = trainer.step(queries, responses, scores)
    assert set(stats) == TRL_STAT_KEYS
    arrays = {
        "objective/kl_dist", "objective/logprobs", "objective/ref_logprobs",
        "tokens/queries_dist", "tokens/responses_dist", "ppo/policy/advantages",
        "ppo/policy/ratio",
    }  # fmt: skip
    for key, value in stats.items():
        if key in arrays:
            assert isinstance(value, np.ndarray), key
            assert np.isfinite(value).all(), key
        else:
            assert type(value) is float and math.isfinite(value), key
    width = max(len(r) for r in responses)
    assert stats["objective/logprobs"].shape == (4, width)
    tokens = sum(len(r) for r in responses)
    assert stats["ppo/policy/ratio"].shape == (2 * tokens,)  # two epochs over every token
    assert stats["objective/kl"] == 0.0  # the reference is a copy of the untrained policy
    assert stats["objective/kl_coef"] == 0.2
    assert stats["ppo/mean_scores"] == pytest.approx(float(torch.stack(scores).mean()))
    assert stats["tokens/responses_len_mean"] == tokens / 4


def test_reference_defaults_to_a_frozen_copy(make_trainer):
    trainer = make_trainer(batch_size=2, mini_batch_size=1, learning_rate=1e-3)
    before = copy.deepcopy(trainer.model.state_dict())
    assert trainer.ref_model is not trainer.model
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())
    trainer.step(*random_batch(2))
    for name, tensor in trainer.ref_model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert not torch.equal(
        trainer.model.state_dict()["transformer.wte.weight"], before["transformer.wte.weight"]
    )


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda q, r, s: (q[:1], r, s), r"queries has 1 elements but config.batch_size is 2"),
        (lambda q, r, s: (q, r, s + s), r"scores has 4 elements"),
        (
            lambda q, r, s: (q, [r[0], torch.tensor([], dtype=torch.long)], s),
            r"responses\[1\] is empty",
        ),
        (lambda q, r, s: (q, r, [s[0], torch.ones(1, 1)]), r"scores\[1\] must be a scalar"),
        (lambda q, r, s: (q, r, [torch.tensor(float("nan")), s[1]]), r"scores\[0\] is nan"),
        (lambda q, r, s: (q, r, [s[0], torch.tensor(float("inf"))]), r"scores\[1\] is inf"),
        (lambda q, r, s: ([q[0], torch.tensor([10**6])], r, s), r"queries\[1\] has token ids"),
        (lambda q, r, s: (q, [r[0], r[1].unsqueeze(0)], s), r"responses\[1\] must be a 1-D"),
    ],
)
def test_bad_step_input_is_a_value_error_naming_the_index(make_trainer, mutate, message):
    trainer = make_trainer(batch_size=2, mini_batch_size=1)
    before = copy.deepcopy(trainer.model.state_dict())
    with pytest.raises(ValueError, match=message):
        trainer.step(*mutate(*random_batch(2)))
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, before[name]), name


def test_batch_size_one_with_one_token_responses_has_no_nan(make_trainer):
    trainer = make_trainer(batch_size=1, mini_batch_size=1, learning_rate=1e-3)
    for seed in range(2):
        queries, responses, scores = random_batch(1, seed=seed, response_lengths=(1, 2))
        assert len(responses[0]) == 1
        stats = trainer.step(queries, responses, scores)
        for key, value in stats.items():
            assert np.isfinite(value).all(), key
    assert stats["ppo/std_scores"] == stats["tokens/queries_len_std"] == 0.0
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_score_scaling_and_clipping_work(make_trainer):
    trainer = make_trainer(
        batch_size=4, mini_batch_size=2, use_score_scaling=True, use_score_norm=True, score_clip=0.5
    )
    queries, responses, _ = random_batch(4)
    scores = [torch.tensor(v) for v in (10.0, -30.0, 4.0, 8.0)]
    stats = trainer.step(queries, responses, scores)
    std = math.sqrt((12**2 + 28**2 + 6**2 + 10**2) / 3)
    assert (trainer.running.mean, trainer.running.std) == (pytest.approx(-2.0), pytest.approx(std))
    # (score + 2) / std is (0.64, -1.49, 0.32, 0.53); clipping to +-0.5 leaves only 6 / std.
    assert stats["ppo/mean_scores"] == pytest.approx((0.5 - 0.5 + 6 / std + 0.5) / 4)


def test_lr_scheduler_steps_once_per_step(make_trainer):
    trainer = make_trainer(batch_size=2, mini_batch_size=1, learning_rate=1e-3)
    trainer.lr_scheduler = torch.optim.lr_scheduler.StepLR(trainer.optimizer, 1, gamma=0.5)
    first = trainer.step(*random_batch(2))
    second = trainer.step(*random_batch(2, seed=1))
    assert (first["ppo/learning_rate"], second["ppo/learning_rate"]) == (1e-3, 5e-4)


def test_training_state_round_trip_resumes_exactly(tiny_model_dir, tokenizer):
    config = {"batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 2, "learning_rate": 1e-3}
    config |= {"use_score_scaling": True, "init_kl_coef": 0.5, "target": 0.001, "seed": 3}
    first = PPOTrainer(
        PPOConfig(**config),
        AutoModelForCausalLMWithValueHead.from_pretrained(tiny_model_dir),
        tokenizer=tokenizer,
    )
    first.step(*random_batch(4, seed=0))
    state = json.loads(json.dumps(first.training_state()))
    weights = copy.deepcopy(first.model.state_dict())
    optimizer_state = copy.deepcopy(first.optimizer.state_dict())
    reference = first.ref_model

    expected = first.step(*random_batch(4, seed=1))

    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_model_dir)
    model.load_state_dict(weights)
    resumed = PPOTrainer(PPOConfig(**config), model, reference, tokenizer)
    resumed.optimizer.load_state_dict(optimizer_state)
    resumed.load_training_state(state)
    assert resumed.kl_ctl.value == state["kl_coef"] != 0.5
    got = resumed.step(*random_batch(4, seed=1))
    for key, value in expected.items():
        if not key.startswith("time/"):
            np.testing.assert_array_equal(got[key], value, err_msg=key)
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name
    assert resumed.training_state() == first.training_state()


def test_trainer_leaves_global_rngs_and_the_callers_config_alone(tiny_model_dir, tokenizer):
    config = PPOConfig(batch_size=2, mini_batch_size=1, seed=123)
    model = AutoModelForCausalLMWithValueHead.from_pretrained(tiny_model_dir)
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()[1].copy()
    trainer = PPOTrainer(config, model, tokenizer=tokenizer)
    trainer.step(*random_batch(2))
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state)
    assert config.world_size is None
    assert isinstance(trainer, TRLCompatMixin)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_step_runs_with_the_model_on_cuda(make_trainer):
    trainer = make_trainer(
        batch_size=4, mini_batch_size=2, kl_penalty="full", use_score_scaling=True
    )
    trainer.model.cuda()
    trainer.ref_model.cuda()
    stats = trainer.step(*random_batch(4))
    assert trainer.current_device.type == "cuda"
    assert all(np.isfinite(value).all() for value in stats.values())


def behaviour_from(old_logprobs: np.ndarray, responses, shift: list[float]) -> list[torch.Tensor]:
    """Each response's old-policy logprobs (a step's ``objective/logprobs`` row) minus its
    ``shift``: the logprobs of a generator that found the response that much less likely."""
    return [
        torch.tensor(old_logprobs[row, : len(response)]) - shift[row]
        for row, response in enumerate(responses)
    ]


def trained_weights(trainer: PPOTrainer) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in trainer.model.state_dict().items()}


def assert_same_weights(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> None:
    assert first.keys() == second.keys()
    for name, tensor in first.items():
        assert torch.equal(tensor, second[name]), name


PPO_TIS_RUN = {"batch_size": 4, "mini_batch_size": 2, "ppo_epochs": 2, "learning_rate": 1e-3}


@pytest.fixture()
def make_seeded_trainer(make_trainer):
    """Trainers whose value heads (randomly initialized) start the same."""

    def make(**ppo_kwargs) -> PPOTrainer:
        torch.manual_seed(0)
        return make_trainer(**ppo_kwargs)

    return make


MISMATCH_STAT_KEYS = {
    f"rollout/correction/{name}"
    for name in (
        "training_ppl",
        "training_log_ppl",
        "kl",
        "k3_kl",
        "rollout_ppl",
        "rollout_log_ppl",
        "log_ppl_diff",
        "log_ppl_abs_diff",
        "log_ppl_diff_max",
        "log_ppl_diff_min",
        "ppl_ratio",
        "chi2_token",
        "chi2_seq",
        "masked_fraction",
    )
}
"""veRL's off-policy metrics (algorithms/corrections.py) and the fraction of tokens no
correction drops."""


def test_without_a_tis_cap_the_behaviour_logprobs_only_add_the_mismatch_stats(make_seeded_trainer):
    queries, responses, scores = random_batch(4)
    plain = make_seeded_trainer(**PPO_TIS_RUN)
    plain_stats = plain.step(queries, responses, scores)
    behaviour = behaviour_from(plain_stats["objective/logprobs"], responses, [5.0] * 4)
    observed = make_seeded_trainer(**PPO_TIS_RUN)
    stats = observed.step(queries, responses, scores, behaviour_logprobs=behaviour)
    capped_but_blind = make_seeded_trainer(**PPO_TIS_RUN, tis_cap=2.0)
    capped_but_blind.step(queries, responses, scores)

    assert_same_weights(trained_weights(observed), trained_weights(plain))
    assert_same_weights(trained_weights(capped_but_blind), trained_weights(plain))
    assert set(stats) == TRL_STAT_KEYS | MISMATCH_STAT_KEYS | {
        "rollout/logprob_diff_mean",
        "rollout/tis_capped_fraction",
    }
    assert stats["ppo/loss/total"] == plain_stats["ppo/loss/total"]
    assert stats["rollout/logprob_diff_mean"] == pytest.approx(5.0)
    assert stats["rollout/tis_capped_fraction"] == 0.0  # no cap, nothing cut


def test_behaviour_logprobs_equal_to_the_old_ones_weigh_1_and_change_nothing(make_seeded_trainer):
    queries, responses, scores = random_batch(4)
    plain = make_seeded_trainer(**PPO_TIS_RUN)
    plain_stats = plain.step(queries, responses, scores)
    behaviour = behaviour_from(plain_stats["objective/logprobs"], responses, [0.0] * 4)
    corrected = make_seeded_trainer(**PPO_TIS_RUN, tis_cap=2.0)
    stats = corrected.step(queries, responses, scores, behaviour_logprobs=behaviour)

    assert_same_weights(trained_weights(corrected), trained_weights(plain))
    assert stats["ppo/loss/policy"] == plain_stats["ppo/loss/policy"]
    assert stats["rollout/logprob_diff_mean"] == 0.0
    assert stats["rollout/tis_capped_fraction"] == 0.0


def test_behaviour_logprobs_far_below_the_old_ones_are_capped_and_counted(make_seeded_trainer):
    queries, responses, scores = random_batch(4)
    one_minibatch = {"batch_size": 4, "mini_batch_size": 4, "ppo_epochs": 1}
    plain_stats = make_seeded_trainer(**one_minibatch).step(queries, responses, scores)
    old_logprobs = plain_stats["objective/logprobs"]
    # Rows 0 and 2 sampled by a generator 5 nats less sure (weight e^5, capped at 2), rows 1
    # and 3 by the old policy itself (weight 1).
    half_stale = behaviour_from(old_logprobs, responses, [5.0, 0.0, 5.0, 0.0])
    stats = make_seeded_trainer(**one_minibatch, tis_cap=2.0).step(
        queries, responses, scores, behaviour_logprobs=half_stale
    )
    tokens = [len(r) for r in responses]
    stale_share = (tokens[0] + tokens[2]) / sum(tokens)
    assert stats["rollout/tis_capped_fraction"] == pytest.approx(stale_share)
    assert stats["rollout/logprob_diff_mean"] == pytest.approx(5.0 * stale_share)

    # Every row stale: every weight is the cap, and the one minibatch's policy loss (taken
    # before any update) doubles; the value loss does not change.
    all_stale = behaviour_from(old_logprobs, responses, [5.0] * 4)
    stats = make_seeded_trainer(**one_minibatch, tis_cap=2.0).step(
        queries, responses, scores, behaviour_logprobs=all_stale
    )
    assert stats["rollout/tis_capped_fraction"] == 1.0
    assert stats["ppo/loss/policy"] == pytest.approx(2 * plain_stats["ppo/loss/policy"], rel=1e-5)
    assert stats["ppo/loss/value"] == pytest.approx(plain_stats["ppo/loss/value"], rel=1e-6)


def test_behaviour_logprobs_of_the_wrong_shape_are_a_value_error(make_trainer):
    trainer = make_trainer(batch_size=2, mini_batch_size=2, tis_cap=2.0)
    queries, responses, scores = random_batch(2)
    behaviour = [torch.zeros(len(responses[0]) + 1), torch.zeros(len(responses[1]))]
    with pytest.raises(ValueError, match=r"behaviour_logprobs\[0\]"):
        trainer.step(queries, responses, scores, behaviour_logprobs=behaviour)
