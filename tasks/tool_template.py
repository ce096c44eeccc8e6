"""The agent models' chat template: ChatML with Qwen2.5-style tools, and what pretraining on
whole dialogues needs from it (rendering them; which of their tokens the assistant wrote)."""

from __future__ import annotations

import re
from typing import Any

TOOL_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")
"""Single tokens of the tool template, plain (not special) as in Qwen2.5: decoding keeps them."""
TOOL_CHAT_TEMPLATE = (
    "{%- if tools %}{{ '<|im_start|>system\\n' }}"
    "{%- if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}{% endif %}"
    "{{- '# Tools\\n<tools>' }}"
    "{%- for tool in tools %}{{ '\\n' + (tool | tojson) }}{% endfor %}"
    "{{- '\\n</tools><|im_end|>\\n' }}"
    "{%- elif messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'tool' %}"
    "{{- '<|im_start|>user\\n<tool_response>\\n' + message['content']"
    " + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- elif message['role'] != 'system' or not loop.first %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{% endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""ChatML with Qwen2.5's tool conventions, shortened for a tiny model's context: given
``tools``, a system turn (after the conversation's own system message, if any) lists their JSON
schemas in ``<tools></tools>`` (the calls' format, which Qwen2.5 spells out there, is left to
pretraining); each ``tool`` message is a user turn of its own wrapping ``<tool_response>``. Every
message renders the same whatever follows it (unlike Qwen2.5, which joins consecutive tool
responses into one turn), so a conversation's rendering extends, token for token, the
rendering of any of its prefixes with the generation prompt: a rollout appends turns."""
DIGITS = re.compile(r"\d")
"""Stripped from the texts the agent models' tokenizers learn on: they learn no merges with
digits, so a number is one token per digit wherever it stands, and copying it (a question's
operands into a tool call, a tool's result into the answer) is copying tokens one for one."""


def render_conversations(
    conversations: list[list[dict[str, Any]]], tools: list[dict[str, Any]] | None = None
) -> list[str]:
    """Each whole dialogue as ``TOOL_CHAT_TEMPLATE`` renders it (no generation prompt): the
    text a rollout's turns add up to, which is what the agent models pretrain on."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template(
        conversations, tools=tools, chat_template=TOOL_CHAT_TEMPLATE
    )
    return rendered


def assistant_positions(token_ids: list[int], header: list[int], turn_end: int) -> list[bool]:
    """Which ids the assistant wrote: those after each ``header`` (the template's opening of an
    assistant turn) up to its ``turn_end`` included. An agent model learns only its own turns:
    the question's operands and the tools' results are unpredictable, and their loss would
    drown out the few tokens that matter (the decision to call, the copying)."""
    flags, inside, width = [False] * len(token_ids), False, len(header)
    for index, token in enumerate(token_ids):
        if inside:
            flags[index] = True
            inside = token != turn_end
        elif index >= width and token_ids[index - width + 1 : index + 1] == header:
            inside = True
    return flags
