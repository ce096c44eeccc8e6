"""Multi-turn rollouts of the agent demos' tiny models with plain transformers, no rollout loop.

Each turn is sampled with ``generate`` (temperature 1, no top-k, as the generators sample) until
the end-of-turn token; the environment's answer is appended as the chat template renders it,
token ids extended, never re-tokenized, the way a rollout loop appends turns. Every turn checks
that the conversation rendered so far is a token prefix of the next rendering.

Used by tests/tasks/test_calculator.py and test_guess.py (slow) and as a script that prints the
numbers: ``python tests/support/agent_rollouts.py calculator|guess [MODEL_DIR] [--episodes N]``
(pretrains into a temporary directory when no model is given).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlfleet.envs.protocol import Step
from rlfleet.tasks import calculator, guess

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


@dataclass
class Episode:
    messages: list[dict[str, Any]]
    token_ids: list[int]
    turns: int
    reward: float
    solved: bool
    prefix_breaks: int = 0
    """Turns whose sampled tokens are not how the template tokenizes the same text."""
    info: dict[str, Any] = field(default_factory=dict)


class Agent:
    """A pretrained tiny model and its tokenizer, sampling one turn at a time."""

    def __init__(self, model_dir: str | Path, seed: int = 0) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        self.max_positions = self.model.config.max_position_embeddings
        torch.manual_seed(seed)

    def render(self, messages: list[dict[str, Any]], tools: list[dict] | None) -> list[int]:
        return list(
            self.tokenizer.apply_chat_template(
                messages, tools=tools, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )

    def sample_turn(self, token_ids: list[int], max_new_tokens: int) -> list[int]:
        """The next turn's ids, the end-of-turn token included when it was reached."""
        room = min(max_new_tokens, self.max_positions - len(token_ids))
        if room < 1:
            return []
        with torch.no_grad():
            out = self.model.generate(
                torch.tensor([token_ids]),
                attention_mask=torch.ones(1, len(token_ids), dtype=torch.long),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=room,
            )
        return out[0, len(token_ids) :].tolist()

    def episode(
        self,
        first: list[dict[str, Any]],
        step: Callable[[str], Step],
        *,
        tools: list[dict] | None = None,
        max_turns: int = 20,
        max_new_tokens: int = 48,
    ) -> Episode:
        messages = list(first)
        token_ids = self.render(messages, tools)
        episode = Episode(messages, token_ids, turns=0, reward=0.0, solved=False)
        for _ in range(max_turns):
            sampled = self.sample_turn(token_ids, max_new_tokens)
            text = self.tokenizer.decode(sampled, skip_special_tokens=True)
            messages.append({"role": "assistant", "content": text})
            token_ids.extend(sampled)
            result = step(text)
            episode.turns += 1
            episode.reward += result.reward
            episode.info = result.info
            if result.done or not sampled or not result.observation:
                break
            messages.extend(result.observation)
            rendered = self.render(messages, tools)
            if rendered[: len(token_ids)] != token_ids:
                episode.prefix_breaks += 1
            token_ids.extend(rendered[len(token_ids) :])
        return episode


class CalculatorSession:
    """The calculator tool behind ``Step``s, as a tool environment parses Hermes calls."""

    def __init__(self, answer: int) -> None:
        self.answer = answer
        self.called = False
        self.tool = calculator.Calculator()

    def step(self, action: str) -> Step:
        match = TOOL_CALL.search(action)
        if match is None:
            solved = calculator.final_answer(action) == self.answer
            info = {"called_tool": self.called, "solved": solved}
            return Step(reward=float(solved), done=True, info=info)
        self.called = True
        try:
            call = json.loads(match.group(1))
            result = self.tool.calculator(**call["arguments"])
        except (ValueError, KeyError, TypeError) as exc:
            result = f"error: {exc}"
        return Step(observation=[{"role": "tool", "content": result}])


def calculator_stats(agent: Agent, rows: list[dict[str, Any]]) -> dict[str, float]:
    """Success, tool-call rate and success when the tool was called, over ``rows``."""
    episodes = []
    for row in rows:
        session = CalculatorSession(row["answer"])
        episodes.append(
            agent.episode(
                row["messages"], session.step, tools=calculator.tool_schemas(), max_turns=3
            )
        )
    called = [e for e in episodes if e.info.get("called_tool")]
    return {
        "success": sum(e.info.get("solved", False) for e in episodes) / len(episodes),
        "tool_rate": len(called) / len(episodes),
        "success_with_tool": sum(e.info.get("solved", False) for e in called) / max(1, len(called)),
        "prefix_breaks": sum(e.prefix_breaks for e in episodes),
    }


def guess_stats(
    agent: Agent, episodes: int, first_guess: int | None = None, seed: int = 0
) -> dict[str, float]:
    """Mean turns to solve (unsolved games count ``MAX_TURNS``) and the solved rate over
    ``episodes`` games; ``first_guess`` forces the opening guess (what RL could make the model
    do) to show the play that follows it."""
    played = []
    for index in range(episodes):
        env = guess.GuessEnv()
        first = env.reset({}, seed * 100_000 + index)
        if first_guess is not None:
            result = env.step(str(first_guess))
            if result.done:
                played.append(Episode(first, [], 1, result.reward, True, info=result.info))
                continue
            first = [*first, {"role": "assistant", "content": str(first_guess)}]
            first.extend(result.observation)
        played.append(agent.episode(first, env.step, max_turns=guess.MAX_TURNS, max_new_tokens=4))
    return {
        "mean_turns": sum(e.info["turns"] for e in played) / len(played),
        "solved": sum(e.info["solved"] for e in played) / len(played),
        "mean_reward": sum(e.reward for e in played) / len(played),
        "prefix_breaks": sum(e.prefix_breaks for e in played),
    }


def main(argv: list[str] | None = None) -> int:
    from rlfleet.tasks.tiny_model import pretrain_calculator_model, pretrain_guess_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("task", choices=("calculator", "guess"))
    parser.add_argument("model", nargs="?", type=Path)
    parser.add_argument("--episodes", type=int, default=200)
    args = parser.parse_args(argv)
    model = args.model
    if model is None:
        started = time.perf_counter()
        pretrain = pretrain_calculator_model if args.task == "calculator" else pretrain_guess_model
        model = pretrain(Path(tempfile.mkdtemp()) / args.task)
        print(f"pretrained {model} in {time.perf_counter() - started:.0f} s")
    agent = Agent(model)
    if args.task == "calculator":
        rows = calculator.prompt_rows(args.episodes, seed=12345)
        print(json.dumps(calculator_stats(agent, rows)))
    else:
        print("sampled:", json.dumps(guess_stats(agent, args.episodes)))
        print("first guess 8:", json.dumps(guess_stats(agent, args.episodes, first_guess=8)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
