"""arithmetic_correct: the GRPO example's verifiable reward."""

from __future__ import annotations

import pytest

from rlfleet.reward.functions import arithmetic_correct, load_function


def score(responses: list[str], answers: list[object], **kwargs: object) -> list[float]:
    return arithmetic_correct(["7+5="] * len(responses), responses, answer=answers, **kwargs)


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("12", 1.0),
        (" 12", 1.0),
        ("12<|endoftext|>", 1.0),
        ("12 because 7 and 5", 1.0),
        ("12.5", 1.0),  # the first integer is 12
        ("13", 0.0),
        ("120", 0.0),
        ("1 2", 0.0),
        ("the answer is 12", 1.0),
        ("", 0.0),
        ("twelve", 0.0),
        ("11 no 12", 0.0),  # the first number counts, not the last
    ],
)
def test_first_integer_compared_exactly(response: str, expected: float) -> None:
    assert score([response], [12]) == [expected]


def test_negative_answers() -> None:
    assert score(["-3", "3", "+3"], [-3, -3, 3]) == [1.0, 0.0, 1.0]


@pytest.mark.parametrize("answer", [12, "12", 12.0, " 12 "])
def test_integer_answers_in_any_type(answer: object) -> None:
    assert score(["12"], [answer]) == [1.0]


@pytest.mark.parametrize("answer", [None, "twelve", 12.5, True, float("nan"), "inf"])
def test_a_bad_reference_answer_names_the_sample(answer: object) -> None:
    with pytest.raises(ValueError, match="sample 1: 'answer'"):
        score(["12", "12"], [12, answer])


def test_missing_answer_field_is_an_error() -> None:
    with pytest.raises(ValueError, match="field 'answer'"):
        arithmetic_correct(["7+5="], ["12"], other=[12])


def test_answer_count_must_match_the_responses() -> None:
    with pytest.raises(ValueError, match="2 values in 'answer' for 1 responses"):
        score(["12"], [12, 12])


def test_answer_field_and_config_kwargs() -> None:
    assert arithmetic_correct(["7+5="], ["12"], answer_field="sum", sum=[12]) == [1.0]


def test_loads_by_name_from_a_job_config() -> None:
    assert load_function("rlfleet.reward.functions:arithmetic_correct") is arithmetic_correct
