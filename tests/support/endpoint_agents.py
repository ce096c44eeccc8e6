"""Agent functions for the agent-job tests, written only with the ``openai`` package (no rlfleet
import): each row's ``kind`` says how the agent behaves."""

from __future__ import annotations

import asyncio
from typing import Any

import openai

TURNS = 3


async def run(
    client: openai.AsyncOpenAI, row: dict[str, Any], sleep_s: float = 0.0
) -> dict[str, Any] | None:
    """``ok``: three calls, the assistant's answer and a user turn appended each time; returns
    each call's prompt and sampled ids as the endpoint reported them (vLLM's
    ``return_token_ids``). ``raise``, ``hang``, ``silent`` (never calls): the faults.
    ``unscored``: like ``ok`` but leaves the reward to the job's reward function. ``long``:
    calls until the endpoint refuses a call for the token budget (and raises then). ``sleep_s``:
    the agent's own work between two calls."""
    kind = row.get("kind", "ok")
    if kind == "raise":
        raise RuntimeError("the agent's own bug")
    if kind == "hang":
        await asyncio.sleep(3600)
    if kind == "silent":
        return {"reward": 1.0}
    messages: list[dict[str, Any]] = [{"role": "user", "content": row["prompt"]}]
    calls = []
    for turn in range(TURNS if kind != "long" else 10**6):
        answer = await client.chat.completions.create(
            model="policy",
            messages=messages,
            max_tokens=6,
            extra_body={"return_token_ids": True},
        )
        choice = answer.choices[0]
        calls.append(
            {
                "prompt": answer.model_extra["prompt_token_ids"],
                "sampled": choice.model_extra["token_ids"],
            }
        )
        messages.append(choice.message.model_dump(exclude_none=True))
        messages.append({"role": "user", "content": f"go on {turn}"})
        await asyncio.sleep(sleep_s)
    if kind == "unscored":
        return None
    return {"reward": float(len(choice.message.content or "") % 3), "calls": calls}
