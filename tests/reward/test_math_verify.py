"""The ``math_verify`` reward (math-verify 0.9): GSM8K and MATH answers, their equivalent forms,
wrong and missing answers, errors naming the sample, and its timeouts in the reward worker."""

from __future__ import annotations

import re
import threading

import pytest

from rlfleet.common.config import RewardConfig
from rlfleet.reward.functions import load_function, math_verify
from rlfleet.reward.scorers import make_scorer

GSM8K_SOLUTION = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72"
)


def scores(responses: list[str], answers: list, **kwargs) -> list[float]:
    return math_verify([""] * len(responses), responses, answer=answers, **kwargs)


def test_gsm8k_answers_after_the_final_mark() -> None:
    responses = [
        "48/2 = 24 in May, so 48 + 24 = 72.\n#### 72",
        "She sold 72 clips.",
        "#### 1,000",
        "In May 24, altogether 48 + 24 = 72.\n#### 71",
        "#### 72 clips",
    ]
    answers = [GSM8K_SOLUTION, GSM8K_SOLUTION, "1000", GSM8K_SOLUTION, "72"]
    assert scores(responses, answers) == [1.0, 1.0, 1.0, 0.0, 1.0]


def test_the_last_gsm8k_mark_counts() -> None:
    assert scores(["#### 70 then I checked\n#### 72"], ["72"]) == [1.0]
    assert scores(["#### 72 then I checked\n#### 70"], ["72"]) == [0.0]


@pytest.mark.parametrize(
    "response",
    [
        "The answer is $\\boxed{\\frac{1}{2}}$.",
        "So the probability is \\boxed{0.5}",
        "Therefore the answer is 1/2",
        "$\\boxed{\\dfrac{1}{2}}$",
        "#### 0.5",
    ],
)
@pytest.mark.parametrize("reference", ["\\frac{1}{2}", "0.5", "\\boxed{\\frac12}", "$1/2$", 0.5])
def test_equivalent_forms_of_one_half_are_equal(response: str, reference: object) -> None:
    assert scores([response], [reference]) == [1.0]


def test_math_answers_compare_as_mathematics() -> None:
    responses = [
        "Hence $\\boxed{\\frac{\\sqrt{2}}{2}}$.",
        "We get $\\boxed{(x+1)^2}$",
        "The interval is \\boxed{(1, 2)}",
        "\\boxed{\\frac{1}{3}}",
        "The answer is \\boxed{-3}",
    ]
    answers = ["\\sqrt{2}/2", "x^2+2x+1", "(1,2)", "\\frac{1}{2}", -3]
    assert scores(responses, answers) == [1.0, 1.0, 1.0, 0.0, 1.0]


def test_the_boxed_answer_wins_over_other_numbers() -> None:
    assert scores(["42 is wrong; the answer is \\boxed{41}"], ["41"]) == [1.0]
    assert scores(["42 is wrong; the answer is \\boxed{41}"], ["42"]) == [0.0]


def test_a_response_without_an_answer_scores_zero() -> None:
    assert scores(["I don't know.", "", "####", "\\boxed{}"], ["42"] * 4) == [0.0] * 4


def test_a_missing_or_unreadable_reference_is_an_error_naming_the_sample() -> None:
    with pytest.raises(ValueError, match="math_verify: sample 1 has no 'answer'"):
        scores(["1", "2"], ["1", None])
    for unreadable in ("", "  ", "#### ", "\\boxed{}"):
        with pytest.raises(
            ValueError, match=re.escape(f"sample 0: 'answer' {unreadable!r} is not")
        ):
            scores(["1"], [unreadable])
    with pytest.raises(ValueError, match=r"'answer'.*\['solution'\]"):
        math_verify([""], ["1"], solution=["1"])
    assert math_verify([""], ["#### 7"], answer_field="solution", solution=["7"]) == [1.0]


@pytest.mark.parametrize("timeout_s", [0, -1, 1.5, True])
def test_timeout_s_must_be_whole_positive_seconds(timeout_s: object) -> None:
    with pytest.raises(ValueError, match="timeout_s"):
        scores(["1"], ["1"], timeout_s=timeout_s)


def test_outside_the_main_thread_it_scores_without_signal_timeouts() -> None:
    """``signal.alarm`` works in a main thread only: math-verify would raise in another."""
    results: list = []
    thread = threading.Thread(target=lambda: results.append(scores(["\\boxed{2}"], ["2"])))
    thread.start()
    thread.join(60)
    assert results == [[1.0]]


def test_it_runs_in_the_reward_worker_by_its_spec() -> None:
    """The worker calls functions in its main thread, so the SIGALRM bounds are on there."""
    spec = "rlfleet.reward.functions:math_verify"
    assert load_function(spec) is math_verify
    scorer = make_scorer(RewardConfig(function=spec, kwargs={"timeout_s": 5}, timeout_s=60))
    try:
        got = scorer.score(
            ["q1", "q2", "q3"],
            ["#### 72", "\\boxed{\\frac{2}{4}}", "no answer"],
            [{"answer": GSM8K_SOLUTION}, {"answer": "0.5"}, {"answer": "3"}],
        )
    finally:
        scorer.close()
    assert got == [1.0, 1.0, 0.0]
