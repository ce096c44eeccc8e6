"""The GRPO example's task is learnable: in one process, GRPO raises the tiny arithmetic model's
success rate on prompts it never trained on (the example's model, reward and prompts; HF
``generate`` sampling instead of the job's vLLM generators)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from rlfleet.common.config import CriticFreeConfig
from rlfleet.reward.functions import arithmetic_correct
from rlfleet.tasks import arithmetic
from rlfleet.tasks.arithmetic import Problem
from rlfleet.trainers.critic_free import CriticFreeTrainer
from rlfleet.trainers.minibatch import eval_mode

GROUP_SIZE, PROMPTS_PER_STEP, STEPS, MAX_NEW_TOKENS = 8, 16, 200, 4


def sample_groups(model, tokenizer, problems: list[Problem]):
    """``GROUP_SIZE`` sampled responses per problem (cut after the first EOS, kept), with their
    queries, group ids and rewards."""
    queries, responses, group_ids = [], [], []
    for group, problem in enumerate(problems):
        query = torch.tensor(tokenizer.encode(problem.prompt))
        with torch.no_grad(), eval_mode(model):
            generated = model.generate(
                query[None],
                do_sample=True,
                top_k=0,
                max_new_tokens=MAX_NEW_TOKENS,
                num_return_sequences=GROUP_SIZE,
                pad_token_id=tokenizer.eos_token_id,
            )[:, len(query) :]
        for row in generated:
            eos = (row == tokenizer.eos_token_id).nonzero()
            responses.append(row[: int(eos[0]) + 1] if len(eos) else row)
            queries.append(query)
            group_ids.append(group)
    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    answers = [problem.answer for problem in problems for _ in range(GROUP_SIZE)]
    rewards = arithmetic_correct([], texts, answer=answers)
    return queries, responses, group_ids, rewards


def success_rate(model, tokenizer, problems: list[Problem]) -> float:
    *_, rewards = sample_groups(model, tokenizer, problems)
    return sum(rewards) / len(rewards)


@pytest.mark.slow
def test_grpo_raises_the_success_rate_on_held_out_prompts(arithmetic_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(arithmetic_model_dir)
    model = AutoModelForCausalLM.from_pretrained(arithmetic_model_dir)
    config = CriticFreeConfig(
        algorithm="grpo",
        batch_size=GROUP_SIZE * PROMPTS_PER_STEP,
        learning_rate=1e-3,
        loss_type="dapo",
        max_completion_length=MAX_NEW_TOKENS,
    )
    trainer = CriticFreeTrainer(config, model, tokenizer)
    train, held_out = arithmetic.split_problems()
    rng = random.Random(0)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        before = success_rate(model, tokenizer, held_out)
        train_rewards = []
        for _ in range(STEPS):
            queries, responses, group_ids, rewards = sample_groups(
                model, tokenizer, rng.sample(train, PROMPTS_PER_STEP)
            )
            trainer.step(queries, responses, [torch.tensor(r) for r in rewards], group_ids)
            train_rewards.append(sum(rewards) / len(rewards))
        after = success_rate(model, tokenizer, held_out)
    finally:
        torch.set_num_threads(previous_threads)
    first, last = train_rewards[:20], train_rewards[-20:]
    assert 0.1 <= before <= 0.4, "the pretrained model should start right 10-40% of the time"
    assert sum(last) / len(last) >= sum(first) / len(first) + 0.2, train_rewards
    assert after >= before + 0.1, (before, after)
