"""The calculator agent task (rlfleet.tasks.calculator), the tool chat template and its model."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rlfleet.cli import main as cli_main
from rlfleet.tasks import calculator, guess
from rlfleet.tasks.calculator import Calculator, Problem, calculator_reward, evaluate, final_answer
from rlfleet.tasks.tiny_model import build_tiny_model, pretrain_calculator_model
from rlfleet.tasks.tool_template import (
    DIGITS,
    TOOL_TOKENS,
    assistant_positions,
    render_conversations,
)

ROOT = Path(__file__).resolve().parents[2]
TOOL_DIALOGUE = [
    {"role": "user", "content": "What is 37*48?"},
    {"role": "assistant", "content": calculator.tool_call_text("37*48")},
    {"role": "tool", "content": "1776"},
    {"role": "assistant", "content": "1776"},
]


def _expression(question: str) -> str:
    return re.search(r"\d+[*+]\d+", question).group(0)


@pytest.fixture(scope="module")
def tool_tokenizer(tmp_path_factory: pytest.TempPathFactory):
    """The calculator model's tokenizer, built as pretraining builds it (untrained weights)."""
    from transformers import AutoTokenizer

    texts = render_conversations(calculator.conversations(300), calculator.tool_schemas())
    model_dir = build_tiny_model(
        tmp_path_factory.mktemp("tool-model") / "m",
        n_positions=256,
        texts=[DIGITS.sub("", text) for text in texts],
        tools=True,
    )
    return AutoTokenizer.from_pretrained(model_dir)


@pytest.mark.parametrize(
    ("expression", "value"),
    [("37*48", 1776), ("1234+8765", 9999), (" 2 + 3*4 ", 14), ("(2+3)*4", 20), ("-5-3", -8)],
)
def test_calculator_evaluates_integer_arithmetic(expression: str, value: int) -> None:
    assert evaluate(expression) == value
    assert Calculator().calculator(expression) == str(value)


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os').system('true')",
        "2**100",
        "7/2",
        "7//2",
        "1.5+1",
        "abs(-3)",
        "x+1",
        "True+1",
        "[1][0]",
        "1+",
        "",
        "1+" * 40 + "1",
    ],
)
def test_calculator_refuses_anything_else(expression: str) -> None:
    with pytest.raises(ValueError):
        evaluate(expression)
    assert Calculator().calculator(expression).startswith("error: ")


def test_tool_schema_is_the_one_the_tool_environment_shows() -> None:
    from rlfleet.envs.tools import tool_schemas

    assert calculator.tool_schemas() == tool_schemas(Calculator)
    (schema,) = calculator.tool_schemas()
    function = schema["function"]
    assert function["name"] == "calculator"
    assert function["parameters"]["properties"]["expression"]["type"] == "string"
    assert function["parameters"]["required"] == ["expression"]


def test_tool_call_is_hermes_format() -> None:
    text = calculator.tool_call_text("37*48")
    assert text.startswith("<tool_call>\n") and text.endswith("\n</tool_call>")
    assert json.loads(text.splitlines()[1]) == {
        "name": "calculator",
        "arguments": {"expression": "37*48"},
    }


def test_corpus_mixes_tool_calls_and_wrong_direct_answers() -> None:
    dialogues = calculator.conversations(4000, p_tool=0.25, seed=0)
    with_tool = [d for d in dialogues if len(d) == 4]
    assert len(with_tool) / len(dialogues) == pytest.approx(0.25, abs=0.03)
    for user, call, tool, answer in with_tool[:200]:
        expression = json.loads(call["content"].splitlines()[1])["arguments"]["expression"]
        assert expression in user["content"]
        assert tool == {"role": "tool", "content": str(evaluate(expression))}
        assert answer == {"role": "assistant", "content": tool["content"]}
    for user, answer in [d for d in dialogues if len(d) == 2][:200]:
        assert int(answer["content"]) != evaluate(_expression(user["content"]))
    assert calculator.conversations(50, seed=3) == calculator.conversations(50, seed=3)


@pytest.mark.parametrize("p_tool", [-0.1, 1.1])
def test_p_tool_outside_0_1_is_an_error(p_tool: float) -> None:
    with pytest.raises(ValueError, match="p_tool"):
        calculator.conversations(3, p_tool=p_tool)


@pytest.mark.parametrize(
    ("response", "answer"),
    [
        ("1776", 1776),
        (" 1776 is the answer", 1776),
        # decoded with special tokens, then without
        (
            "<tool_call>\n{}\n</tool_call><|im_end|>\n<|im_start|>user\n<tool_response>\n1776\n"
            "</tool_response><|im_end|>\n<|im_start|>assistant\n1776<|im_end|>",
            1776,
        ),
        (
            "<tool_call>\n{}\n</tool_call>\nuser\n<tool_response>\n1776\n</tool_response>\n"
            "assistant\n1776",
            1776,
        ),
        (
            "<tool_call>\n{}\n</tool_call>user\n<tool_response>\n-12\n</tool_response>assistant\n-12",
            -12,
        ),
    ],
)
def test_final_answer_is_what_follows_the_last_tool_response(response: str, answer: int) -> None:
    assert final_answer(response) == answer


@pytest.mark.parametrize(
    "response",
    [
        "",
        "I do not know",
        '<tool_call>\n{"name": "calculator", "arguments": {"expression": "37*48"}}\n</tool_call>',
        "<tool_response>\n1776\n</tool_response>\nassistant\n<tool_call>\n{}\n</tool_call>",
    ],
)
def test_no_final_answer(response: str) -> None:
    assert final_answer(response) is None


def test_reward_scores_the_final_answer_only() -> None:
    responses = [
        "1776",
        "1775",
        "<tool_call>\n{}\n</tool_call>\n<tool_response>\n1776\n</tool_response>\nassistant\n1776",
        "<tool_call>\n{}\n</tool_call>\n<tool_response>\n1776\n</tool_response>\nassistant\n17",
        '<tool_call>\n{"arguments": {"expression": "1776"}}\n</tool_call>',
    ]
    scores = calculator_reward([""] * 5, responses, answer=[1776, 1776, "1776", 1776, 1776])
    assert scores == [1.0, 0.0, 1.0, 0.0, 0.0]
    assert calculator_reward(["p"], ["5"], expected=[5], answer_field="expected") == [1.0]


def test_reward_needs_an_answer_per_response() -> None:
    with pytest.raises(ValueError, match="'answer'"):
        calculator_reward(["p"], ["5"])
    with pytest.raises(ValueError, match="sample 0"):
        calculator_reward(["p"], ["5"], answer=[None])


def test_prompt_files_split_train_and_eval(tmp_path: Path) -> None:
    train_path, eval_path = calculator.write_prompts(tmp_path / "calc.jsonl", n=300)
    assert eval_path == tmp_path / "calc_eval.jsonl"
    train = [json.loads(line) for line in train_path.read_text().splitlines()]
    held_out = [json.loads(line) for line in eval_path.read_text().splitlines()]
    assert len(held_out) == 30 and 250 <= len(train) <= 270
    assert not {json.dumps(r["messages"]) for r in train} & {
        json.dumps(r["messages"]) for r in held_out
    }
    for row in train + held_out:
        assert set(row) == {"messages", "answer"}
        (message,) = row["messages"]
        assert message["role"] == "user"
        assert evaluate(_expression(message["content"])) == row["answer"]


def test_tool_template_renders_qwen_style_tool_turns(tool_tokenizer) -> None:
    text = tool_tokenizer.apply_chat_template(
        TOOL_DIALOGUE, tools=calculator.tool_schemas(), tokenize=False
    )
    schema = json.dumps(calculator.tool_schemas()[0], ensure_ascii=False)
    assert text == (
        f"<|im_start|>system\n# Tools\n<tools>\n{schema}\n</tools><|im_end|>\n"
        "<|im_start|>user\nWhat is 37*48?<|im_end|>\n"
        f"<|im_start|>assistant\n{calculator.tool_call_text('37*48')}<|im_end|>\n"
        "<|im_start|>user\n<tool_response>\n1776\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n1776<|im_end|>\n"
    )
    with_system = [{"role": "system", "content": "Be exact."}, *TOOL_DIALOGUE[:1]]
    rendered = tool_tokenizer.apply_chat_template(
        with_system, tools=calculator.tool_schemas(), tokenize=False, add_generation_prompt=True
    )
    assert rendered.startswith("<|im_start|>system\nBe exact.\n\n# Tools\n<tools>\n")
    assert rendered.endswith("What is 37*48?<|im_end|>\n<|im_start|>assistant\n")
    assert rendered.count("Be exact.") == 1
    no_tools = tool_tokenizer.apply_chat_template(with_system, tokenize=False)
    assert no_tools == (
        "<|im_start|>system\nBe exact.<|im_end|>\n<|im_start|>user\nWhat is 37*48?<|im_end|>\n"
    )


def _ids(tokenizer, messages, tools, generation_prompt: bool) -> list[int]:
    return list(
        tokenizer.apply_chat_template(
            messages,
            tools=tools,
            tokenize=True,
            add_generation_prompt=generation_prompt,
            return_dict=False,
        )
    )


@pytest.mark.parametrize("tools", [calculator.tool_schemas(), None])
def test_each_turn_extends_the_previous_rendering_token_for_token(tool_tokenizer, tools) -> None:
    """What a rollout relies on: the prompt of turn k is a token prefix of every later one."""
    dialogue = [
        *TOOL_DIALOGUE[:3],
        {"role": "assistant", "content": calculator.tool_call_text("1776+1")},
        {"role": "tool", "content": "1777"},
        {"role": "tool", "content": "error: two at once"},
        {"role": "assistant", "content": "1777"},
    ]
    renderings = [
        _ids(tool_tokenizer, dialogue[:k], tools, generation_prompt=True)
        for k in range(1, len(dialogue))
        if dialogue[k]["role"] == "assistant"
    ]
    renderings.append(_ids(tool_tokenizer, dialogue, tools, generation_prompt=False))
    for shorter, longer in zip(renderings, renderings[1:], strict=False):
        assert longer[: len(shorter)] == shorter


def test_tool_tokens_and_digits_are_single_tokens(tool_tokenizer) -> None:
    for token in TOOL_TOKENS:
        assert len(tool_tokenizer(token).input_ids) == 1
        ids = tool_tokenizer(f"a{token}b").input_ids
        assert tool_tokenizer.decode(ids, skip_special_tokens=True) == f"a{token}b"
    for text in ("What is 37*48?", '"37*48"', "\n1776\n", " 1776"):
        digits = [t for t in tool_tokenizer.tokenize(text) if any(c.isdigit() for c in t)]
        assert digits == [c for c in text if c.isdigit()]


@pytest.mark.slow
def test_pretrained_model_rarely_succeeds_alone_but_copies_the_tool(tmp_path: Path) -> None:
    """The RL starting point: success at most ~0.3 at temperature 1, the tool called now and
    then (the calls RL reinforces), and a call often right (measured here: about 0.36-0.64 of
    the answers after a call are right; the expression is copied into the call about 68% of
    the time, the result into the answer about 95%)."""
    from support.agent_rollouts import Agent, calculator_stats

    from rlfleet.actors.vllm_engine import cpu_serve_problem

    model_dir = pretrain_calculator_model(tmp_path / "calc")
    assert cpu_serve_problem(model_dir) is None
    stats = calculator_stats(Agent(model_dir), calculator.prompt_rows(150, seed=12345))
    assert stats["success"] <= 0.35, stats
    assert 0.1 <= stats["tool_rate"] <= 0.4, stats
    assert stats["success_with_tool"] >= 0.2, stats
    assert stats["prefix_breaks"] <= 3, stats


def test_problem_answers() -> None:
    assert Problem(37, "*", 48).answer == 1776
    assert Problem(1234, "+", 8765).expression == "1234+8765"


def test_assistant_positions_mark_the_assistant_turns_only() -> None:
    header, end = [7, 8, 9], 3
    ids = [1, 7, 8, 2, 3, 7, 8, 9, 4, 5, 3, 9, 7, 8, 9, 6]
    flags = assistant_positions(ids, header, end)
    assert [i for i, flag in zip(ids, flags, strict=True) if flag] == [4, 5, 3, 6]
    assert flags[8:11] == [True, True, True] and not any(flags[:8])


@pytest.mark.parametrize("task", ["calculator", "guess"])
def test_committed_prompt_files_match_the_generators(task: str, tmp_path: Path) -> None:
    module = calculator if task == "calculator" else guess
    for written in module.write_prompts(tmp_path / f"agent_{task}_prompts.jsonl"):
        assert (ROOT / "examples" / written.name).read_text() == written.read_text()


def test_cli_pretrains_the_agent_models(tmp_path: Path) -> None:
    for task in ("calculator", "guess"):
        arguments = ["tiny-model", str(tmp_path / task), "--task", task, "--steps", "1"]
        assert cli_main(arguments) == 0
        assert (tmp_path / task / "model.safetensors").is_file()
