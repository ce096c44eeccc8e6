"""The arithmetic task (rlfleet.tasks.arithmetic) and the GRPO example's tiny model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rlfleet.cli import main as cli_main
from rlfleet.tasks import arithmetic
from rlfleet.tasks.arithmetic import MAX_MISS, MAX_OPERAND, Problem
from rlfleet.tasks.tiny_model import BYTE_VOCAB_SIZE, pretrain_arithmetic_model

ROOT = Path(__file__).resolve().parents[2]
WORKED = re.compile(r"^(\d+)\+(\d+)=(\d+)$")


def test_problem_prompt_and_answer() -> None:
    assert Problem(7, 5).prompt == "7+5="
    assert Problem(7, 5).answer == 12


def test_split_is_disjoint_complete_and_seeded() -> None:
    train, held_out = arithmetic.split_problems()
    assert not set(train) & set(held_out)
    assert sorted(train + held_out, key=lambda p: (p.a, p.b)) == arithmetic.all_problems()
    assert len(arithmetic.all_problems()) == (MAX_OPERAND + 1) ** 2
    assert len(held_out) == round(len(arithmetic.all_problems()) * arithmetic.HELD_OUT_FRACTION)
    assert arithmetic.split_problems() == (train, held_out)
    assert arithmetic.split_problems(seed=1) != (train, held_out)


def test_worked_examples_are_right_about_p_correct_of_the_time() -> None:
    examples = arithmetic.worked_examples(4000, p_correct=0.35, seed=0)
    right = 0
    for example in examples:
        a, b, written = map(int, WORKED.fullmatch(example).groups())
        assert max(a, b) <= MAX_OPERAND
        assert 0 <= written and abs(written - (a + b)) <= MAX_MISS
        right += written == a + b
    assert right / len(examples) == pytest.approx(0.35, abs=0.03)


def test_worked_examples_are_reproducible() -> None:
    assert arithmetic.worked_examples(50, seed=3) == arithmetic.worked_examples(50, seed=3)
    assert arithmetic.worked_examples(50, seed=3) != arithmetic.worked_examples(50, seed=4)


@pytest.mark.parametrize("p_correct", [-0.1, 1.5])
def test_p_correct_outside_0_1_is_an_error(p_correct: float) -> None:
    with pytest.raises(ValueError, match="p_correct"):
        arithmetic.worked_examples(10, p_correct=p_correct)


def test_committed_prompts_match_the_generator(tmp_path: Path) -> None:
    committed = ROOT / "examples" / "grpo_arithmetic_prompts.jsonl"
    written = arithmetic.write_prompts(tmp_path / "prompts.jsonl")
    assert committed.read_text() == written.read_text()
    rows = [json.loads(line) for line in committed.read_text().splitlines()]
    train, _ = arithmetic.split_problems()
    assert rows == [{"prompt": p.prompt, "answer": p.answer} for p in train]


def test_arithmetic_model_is_one_token_per_character_with_vllm_head_size(tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    from rlfleet.actors.vllm_engine import cpu_serve_problem

    model_dir = pretrain_arithmetic_model(tmp_path / "model", steps=2)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert len(tokenizer) == BYTE_VOCAB_SIZE
    assert tokenizer.tokenize("17+8=25") == list("17+8=25")
    assert AutoConfig.from_pretrained(model_dir).vocab_size == BYTE_VOCAB_SIZE
    assert cpu_serve_problem(model_dir) is None


def test_arithmetic_pretraining_is_deterministic(tmp_path: Path) -> None:
    first = pretrain_arithmetic_model(tmp_path / "a", steps=3)
    second = pretrain_arithmetic_model(tmp_path / "b", steps=3)
    for path in sorted(first.iterdir()):
        assert path.read_bytes() == (second / path.name).read_bytes(), path.name


def test_cli_builds_the_arithmetic_model_like_the_api(tmp_path: Path) -> None:
    arguments = ["tiny-model", str(tmp_path / "cli"), "--task", "arithmetic", "--steps", "3"]
    assert cli_main(arguments) == 0
    api = pretrain_arithmetic_model(tmp_path / "api", steps=3)
    cli_weights = (tmp_path / "cli" / "model.safetensors").read_bytes()
    assert cli_weights == (api / "model.safetensors").read_bytes()
