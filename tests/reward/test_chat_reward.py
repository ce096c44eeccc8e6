"""A reward function of a chat dataset gets each sample's conversation as ``messages`` and the
completion's text, from the prompt batch through the reward actor."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from support.job_configs import small_job

from rlfleet.common.config import RewardConfig
from rlfleet.common.schema import with_columns
from rlfleet.job.data import PromptBatches, checked_rows
from rlfleet.reward.actor import RewardActor
from rlfleet.tasks.tiny_model import build_tiny_model

CONVERSATIONS = [
    [{"role": "user", "content": "say yes"}],
    [{"role": "user", "content": "say no"}, {"role": "assistant", "content": "no"}],
]


def echoes_the_last_user_turn(
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    messages: Sequence[list[dict[str, str]]],
    **_: Any,
) -> list[float]:
    """1.0 where the completion is the last user message's last word, else 0.0; plus the
    number of messages in the conversation / 10."""
    scores = []
    for conversation, response in zip(messages, responses, strict=True):
        last_user = [m["content"] for m in conversation if m["role"] == "user"][-1]
        scores.append(float(response == last_user.split()[-1]) + len(conversation) / 10)
    return scores


def test_the_reward_function_gets_the_messages_and_the_completion_text(tmp_path: Path) -> None:
    model_dir = build_tiny_model(tmp_path / "model", chat_template=True)
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    dataset = {"path": str(path), "messages_field": "messages", "system_prompt": "obey"}
    job = small_job(model_dir, tmp_path / "run", dataset={**dataset, "shuffle": False})
    batch = PromptBatches.from_config(job, checked_rows(job)).next_batch(2)
    generated = with_columns(batch, response=["yes", "maybe"], response_ids=[[5], [6]])

    reward = RewardConfig(function=f"{__name__}:echoes_the_last_user_turn")
    scores = RewardActor(0, reward).score(generated).column("score").to_pylist()

    # float32 scores; 2 and 3 messages with the system prompt, and only the first echoes
    assert scores == pytest.approx([1.2, 0.3], rel=1e-7)
