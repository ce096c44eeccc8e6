"""Chat-formatted prompts: OpenAI-style message lists rendered with the tokenizer's chat template,
and the token ids that end the model's turn.

A conversation is a list of ``{"role": ..., "content": ...}`` messages with string content. It
becomes the prompt's text through ``tokenizer.apply_chat_template`` with the generation prompt
added (the opening of the assistant's turn), so the model writes the next assistant message.
Generation then stops at any id of ``stop_token_ids``: the tokenizer's EOS and every EOS id of
the model's generation config (a chat model lists its end-of-turn token there).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

Message = dict[str, str]

MESSAGES_METADATA_KEY = "messages"
"""The metadata key (and so the reward-function keyword) of a sample's conversation."""


class ChatFormatError(ValueError):
    """A conversation that is not a non-empty list of role/content messages, or a tokenizer
    without a chat template."""


def checked_messages(value: Any, where: str) -> list[Message]:
    """``value`` if it is a non-empty list of messages with string ``role`` and ``content``
    (other keys allowed); else a ``ChatFormatError`` starting with ``where``."""
    if not isinstance(value, list) or not value:
        raise ChatFormatError(f"{where}: expected a non-empty list of messages, got {value!r}")
    for index, message in enumerate(value):
        if not isinstance(message, dict) or not all(
            isinstance(message.get(key), str) for key in ("role", "content")
        ):
            raise ChatFormatError(
                f"{where}: message {index} must be an object with string 'role' and 'content', "
                f"got {message!r}"
            )
    return value


def with_system_prompt(messages: list[Message], system_prompt: str | None) -> list[Message]:
    """``messages`` with ``system_prompt`` as a first system message, unless there is no system
    prompt or the conversation already opens with its own system message (the row's own is the
    more specific)."""
    if system_prompt is None or messages[0]["role"] == "system":
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def check_chat_template(tokenizer: Any, model_dir: str | Path, field: str) -> None:
    """A ``ChatFormatError`` naming the model directory and the dataset field when the
    tokenizer has no chat template to render that field's conversations with."""
    if not getattr(tokenizer, "chat_template", None):
        raise ChatFormatError(
            f"dataset.messages_field: the tokenizer of {model_dir} has no chat template to render "
            f"the conversations in {field!r}; use a model whose tokenizer has one, or give "
            "the prompts as text in dataset.prompt_field"
        )


def render_chat(
    tokenizer: Any, messages: list[Message], tools: list[dict[str, Any]] | None = None
) -> str:
    """The conversation as the prompt text, the assistant's turn opened; ``tools``: the JSON
    schemas of the tools the model may call (a multi-turn job's ``env.tools``)."""
    return tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True
    )


def stop_token_ids(model_dir: str | Path, tokenizer: Any = None) -> tuple[int, ...]:
    """Every id that ends generation: the tokenizer's EOS (when a tokenizer is given) and the
    generation config's EOS ids (an int or a list; config.json's when the model directory has no
    generation config naming any), first seen first, each once."""
    model_dir = Path(model_dir)
    ids = [] if tokenizer is None else [tokenizer.eos_token_id]
    for name in ("generation_config.json", "config.json"):
        path = model_dir / name
        eos = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
        if eos is not None:
            ids.extend(_as_ids(eos))
            break
    return tuple(dict.fromkeys(i for i in ids if i is not None))


def _as_ids(eos: int | Iterable[int]) -> list[int]:
    return [eos] if isinstance(eos, int) else list(eos)
