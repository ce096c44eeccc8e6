"""The arithmetic task of the GRPO example: sums of small integers with exact answers.

A prompt is ``"7+5="`` and its answer the integer ``12``. Every problem ``a+b=`` with
``0 <= a, b <= MAX_OPERAND`` is split once, by a fixed seed, into the prompts GRPO trains on
(``examples/grpo_arithmetic_prompts.jsonl``) and held-out prompts that measure whether what it
learned carries over.

The tiny model's pretraining text (``worked_examples``) is a noisy teacher: each worked example
``"7+5=12"`` shows the right sum with probability ``p_correct`` and otherwise a near miss (the
sum off by 1 to ``MAX_MISS``). A model that learns it answers right about ``p_correct`` of the time
at temperature 1, and the right answer is always among the ones it samples: a verifiable reward
has something to pick out, and GRPO can raise the success rate within minutes on a CPU.

``examples/grpo_arithmetic_prompts.jsonl`` is ``write_prompts``'s output, committed (a test keeps
the two in step): ``python -c "import rlfleet.tasks.arithmetic as a; a.write_prompts(PATH)"``.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

MAX_OPERAND = 9
MAX_MISS = 3
HELD_OUT_FRACTION = 0.25
SPLIT_SEED = 0


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def prompt(self) -> str:
        return f"{self.a}+{self.b}="

    @property
    def answer(self) -> int:
        return self.a + self.b


def all_problems() -> list[Problem]:
    """Every ``a+b=`` with both operands in ``[0, MAX_OPERAND]``, in a fixed order."""
    return [Problem(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]


def split_problems(seed: int = SPLIT_SEED) -> tuple[list[Problem], list[Problem]]:
    """``(train, held_out)``: a seeded shuffle of every problem, ``HELD_OUT_FRACTION`` held out."""
    problems = all_problems()
    random.Random(seed).shuffle(problems)
    n_held_out = round(len(problems) * HELD_OUT_FRACTION)
    return problems[n_held_out:], problems[:n_held_out]


def worked_example(problem: Problem, rng: random.Random, p_correct: float) -> str:
    """``"a+b=s"`` with the right sum ``s`` with probability ``p_correct``, else a near miss
    (never negative)."""
    if rng.random() < p_correct:
        return f"{problem.prompt}{problem.answer}"
    misses = [
        problem.answer + offset
        for offset in range(-MAX_MISS, MAX_MISS + 1)
        if offset != 0 and problem.answer + offset >= 0
    ]
    return f"{problem.prompt}{rng.choice(misses)}"


def worked_examples(n: int, *, p_correct: float = 0.3, seed: int = 0) -> list[str]:
    """``n`` worked examples drawn over every problem (held-out ones included: the model knows
    the format and roughly the sums of all; GRPO sharpens them), the same for the same seed."""
    if not 0 <= p_correct <= 1:
        raise ValueError(f"p_correct must be in [0, 1], got {p_correct}")
    rng = random.Random(seed)
    problems = all_problems()
    return [worked_example(rng.choice(problems), rng, p_correct) for _ in range(n)]


def prompt_rows(problems: list[Problem]) -> list[dict[str, object]]:
    """Dataset rows: the prompt and its exact answer (the reward's ``answer`` field)."""
    return [{"prompt": problem.prompt, "answer": problem.answer} for problem in problems]


def write_prompts(path: str | Path, seed: int = SPLIT_SEED) -> Path:
    """Write the training prompts as JSONL, one ``{"prompt", "answer"}`` object per line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    train, _ = split_problems(seed)
    path.write_text("".join(json.dumps(row) + "\n" for row in prompt_rows(train)))
    return path
