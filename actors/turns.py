"""Token ids of a multi-turn conversation, built token-in/token-out.

The prompt is rendered and tokenized once. After that, the ids the engine sampled are appended
exactly as it sampled them (never decoded and re-encoded), and each observation adds only the
ids of what the chat template puts *after* the assistant's turn: the rest of the turn's closing
(for ChatML, the newline after ``<|im_end|>``, which the model does not sample since it stops
at ``<|im_end|>``) and the new messages with the next generation prompt. Those are found as the
template's text delta: the rendering of a fixed conversation with and without the new messages.

A template that renders earlier turns differently once later ones are added (one that strips
the reasoning of earlier assistant turns, say) would have fed the model other tokens than the
ones kept here. Since the next turn is sampled from exactly the ids kept here, the trained
tokens are still the ones the model saw; ``rerender_matches`` lets the loop count the
trajectories where the template would have disagreed.
"""

from __future__ import annotations

from functools import cached_property
from typing import Any

from rlfleet.common.chat import ChatFormatError

Message = dict[str, Any]

_BASE: list[Message] = [
    {"role": "user", "content": "ping"},
    {"role": "assistant", "content": "pong"},
]
"""A fixed conversation the template's deltas are measured after."""


class TemplateError(ValueError):
    """A chat template whose renderings do not extend each other."""


class TurnTokens:
    """Renders and tokenizes a conversation's pieces with one tokenizer and tool list."""

    def __init__(self, tokenizer: Any, tools: list[dict[str, Any]] | None = None) -> None:
        self._tokenizer = tokenizer
        self._tools = tools or None
        self._chat = bool(getattr(tokenizer, "chat_template", None))

    @property
    def chat(self) -> bool:
        """Whether the tokenizer has a chat template (messages can be rendered)."""
        return self._chat

    def render(self, messages: list[Message], generation_prompt: bool = True) -> str:
        if not self._chat:
            raise ChatFormatError("the tokenizer has no chat template to render messages with")
        return self._tokenizer.apply_chat_template(
            messages, tools=self._tools, tokenize=False, add_generation_prompt=generation_prompt
        )

    def encode(self, text: str) -> list[int]:
        """Text (a rendering, or an environment's text) as ids, no special tokens added."""
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """The first prompt: the conversation rendered with the generation prompt."""
        return self.encode(self.render(messages))

    def closing_ids(self, turn_ids: list[int]) -> list[int]:
        """What closes a sampled assistant turn before the next message: the template's
        closing after the content, less its first id when the model sampled that one (it
        stopped at the end-of-turn token)."""
        closing = self._closing
        if closing and turn_ids and turn_ids[-1] == closing[0]:
            return closing[1:]
        return list(closing)

    def observation_ids(self, observation: str | list[Message]) -> list[int]:
        """An observation's ids: text as it is tokenized; messages as the template's delta
        (the messages and the next generation prompt)."""
        if isinstance(observation, str):
            return self.encode(observation)
        with_messages = self.render([*_BASE, *observation])
        if not with_messages.startswith(self._base_text):
            raise TemplateError(
                "the chat template renders the earlier turns differently once new messages "
                "follow them, so the observation's tokens cannot be appended"
            )
        return self.encode(with_messages[len(self._base_text) :])

    def rerender_matches(self, messages: list[Message], ids: list[int]) -> bool:
        """Whether rendering ``messages`` afresh (with the generation prompt) gives ``ids``."""
        return self.prompt_ids(messages) == ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    def turn_text(self, ids: list[int], finish_reason: str, stop_ids: tuple[int, ...]) -> str:
        """A sampled turn's text, less the id that ended it: one of ``stop_ids``, the template's
        end of turn or the tokenizer's EOS (what an environment or an agent is given)."""
        ends = {*stop_ids, *self.closing_ids([])[:1], self._tokenizer.eos_token_id}
        if finish_reason == "stop" and ids and ids[-1] in ends:
            ids = ids[:-1]
        return self.decode(ids)

    def decode_responses(self, responses: list[list[int]]) -> list[str]:
        """Plain responses as the generators decode them (special tokens left out)."""
        return self._tokenizer.batch_decode(responses, skip_special_tokens=True)

    @cached_property
    def _base_text(self) -> str:
        """The fixed conversation rendered (made on first use: a plain rollout never needs it)."""
        return self.render(_BASE, generation_prompt=False) if self._chat else ""

    @cached_property
    def _closing(self) -> list[int]:
        if not self._chat:
            return []
        content = _BASE[-1]["content"]
        end = self._base_text.rindex(content) + len(content)
        return self.encode(self._base_text[end:])
