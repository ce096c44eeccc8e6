"""Chat datasets: rows of OpenAI-style messages rendered with the tokenizer's chat template, the
system prompt, the conversation in the metadata, and the errors before any actor starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError
from support.job_configs import small_job
from transformers import AutoTokenizer

from rlfleet.common.config import DatasetConfig
from rlfleet.job.checks import ConfigError
from rlfleet.job.data import PromptBatches, checked_rows, read_prompt_rows
from rlfleet.tasks.tiny_model import build_tiny_model

SYSTEM = "You review things."
ROWS = [
    {"chat": [{"role": "user", "content": "the movie was"}], "answer": 1},
    {
        "chat": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "honestly this phone is"},
        ],
        "answer": 2,
    },
]


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("chat-model"), chat_template=True)


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def chat_job(model_dir: Path, tmp_path: Path, rows: list[dict] = ROWS, **dataset):
    path = write_rows(tmp_path / "chat.jsonl", rows)
    section = {"path": str(path), "messages_field": "chat", "shuffle": False, **dataset}
    return small_job(model_dir, tmp_path / "run", dataset=section)


def test_conversations_are_rendered_with_the_template_and_travel_as_messages(
    chat_model_dir: Path, tmp_path: Path
) -> None:
    job = chat_job(chat_model_dir, tmp_path, system_prompt=SYSTEM)
    rows = checked_rows(job)
    batch = PromptBatches.from_config(job, rows).next_batch(2, samples_per_prompt=2)

    tokenizer = AutoTokenizer.from_pretrained(chat_model_dir)
    conversations = [
        [{"role": "system", "content": SYSTEM}, *ROWS[0]["chat"]],
        ROWS[1]["chat"],  # its own system message wins over dataset.system_prompt
    ]
    texts = [
        tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True)
        for c in conversations
    ]
    assert texts[0] == (
        f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\nthe movie was<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert batch.column("prompt").to_pylist() == [texts[0]] * 2 + [texts[1]] * 2
    ids = [tokenizer.encode(text, add_special_tokens=False) for text in texts]
    assert batch.column("prompt_ids").to_pylist() == [ids[0]] * 2 + [ids[1]] * 2
    metadata = [json.loads(m) for m in batch.column("metadata").to_pylist()]
    assert (
        metadata
        == [{"answer": 1, "messages": conversations[0]}] * 2
        + [{"answer": 2, "messages": conversations[1]}] * 2
    )


def test_a_chat_dataset_with_a_tokenizer_without_template_names_the_model_and_field(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError) as error:
        checked_rows(chat_job(tiny_model_dir, tmp_path))
    message = str(error.value)
    assert message.startswith(f"dataset.messages_field: the tokenizer of {tiny_model_dir} has no")
    assert "'chat'" in message and "\n" not in message


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            [ROWS[0], {"chat": "hello"}],
            r"^dataset\.messages_field: row 1 of .*chat\.jsonl, field 'chat': expected a "
            r"non-empty list of messages, got 'hello'$",
        ),
        (
            [{"chat": [{"role": "user", "content": 3}]}],
            r"^dataset\.messages_field: row 0 of .*, field 'chat': message 0 must be an object",
        ),
        (
            [{"prompt": "the movie was"}],
            r"^dataset\.messages_field: row 0 .* got None$",
        ),
        (
            [{**ROWS[0], "messages": "other"}],
            r"^dataset\.messages_field: row 0 of .* has a field 'messages' beside the "
            r"conversations in 'chat'; .* rename that field$",
        ),
    ],
)
def test_bad_conversations_name_the_key_the_row_and_the_field(
    tmp_path: Path, rows: list[dict], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        read_prompt_rows(write_rows(tmp_path / "chat.jsonl", rows), "prompt", "chat")


def test_a_conversation_too_long_for_the_context_names_its_row(chat_model_dir, tmp_path) -> None:
    rows = [ROWS[0], {"chat": [{"role": "user", "content": "word " * 200}]}]
    with pytest.raises(ConfigError, match=r"^dataset\.path: row 1 of .*: the prompt is \d+ tokens"):
        checked_rows(chat_job(chat_model_dir, tmp_path, rows))


def test_a_reward_kwarg_named_messages_clashes_with_the_conversation(chat_model_dir, tmp_path):
    job = chat_job(chat_model_dir, tmp_path)
    job.reward.kwargs = {"messages": "mine"}
    with pytest.raises(ConfigError, match=r"fields \['messages'\] that clash"):
        checked_rows(job)


def test_a_system_prompt_needs_a_messages_field() -> None:
    with pytest.raises(ValidationError, match=r"dataset\.system_prompt needs dataset\.messages"):
        DatasetConfig(path="p.jsonl", system_prompt=SYSTEM)
