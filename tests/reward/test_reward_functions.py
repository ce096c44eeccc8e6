import re

import pytest

from rlfleet.reward.functions import exact_match, length_penalty, load_function, sentiment

VADER_EXAMPLE = "VADER is smart, handsome, and funny."


def test_sentiment_of_vader_example_is_its_published_compound_score():
    assert sentiment(["any prompt"], [VADER_EXAMPLE]) == [0.8316]


def test_sentiment_sign_follows_the_text():
    scores = sentiment(
        ["", "", ""],
        ["What a wonderful, lovely day!", "This is terrible, I hate it.", "The table is red."],
    )
    assert scores[0] > 0.5
    assert scores[1] == -0.7783
    assert scores[2] == 0.0


def test_sentiment_ignores_prompt_and_dataset_fields():
    scores = sentiment(["I hate this awful prompt"], [VADER_EXAMPLE], answer=["x"])
    assert scores == [0.8316]


def test_exact_match_normalises_whitespace_case_and_final_punctuation():
    responses = ["Paris.", "  paris \n", "PARIS!", "Lyon", "Paris, France"]
    assert exact_match([""] * 5, responses, answer=["Paris"] * 5) == [1.0, 1.0, 1.0, 0.0, 0.0]


def test_exact_match_case_sensitive():
    scores = exact_match(
        ["", ""], ["paris", "Paris"], answer=["Paris", "Paris"], case_sensitive=True
    )
    assert scores == [0.0, 1.0]


def test_exact_match_last_number_compares_numerically():
    responses = ["2 + 2 = 4", "The total is 1,000.", "0.50", "12 or maybe 13", "no idea", "-3"]
    answers = [4, "1000.0", 0.5, "12", "3", "-3"]
    scores = exact_match([""] * 6, responses, answer=answers, extract="last_number")
    assert scores == [1.0, 1.0, 1.0, 0.0, 0.0, 1.0]


def test_exact_match_regex_takes_last_match_and_its_group():
    responses = ["3 * 24 = 72\n#### 72", "#### 70 ... #### 71", "72"]
    scores = exact_match([""] * 3, responses, answer=["72"] * 3, extract=r"####\s*(\S+)")
    assert scores == [1.0, 0.0, 0.0]
    assert exact_match([""], ["a b c"], answer=["c"], extract=r"[a-z]") == [1.0]


def test_exact_match_reads_the_configured_answer_field():
    assert exact_match([""], ["42"], answer_field="solution", solution=["42"]) == [1.0]


def test_exact_match_without_answer_field_names_it_and_the_fields_given():
    with pytest.raises(ValueError, match=r"'answer'.*\['solution'\]"):
        exact_match([""], ["42"], solution=["42"])


def test_exact_match_sample_without_answer_is_an_error_naming_it():
    with pytest.raises(ValueError, match="sample 1 has no 'answer'"):
        exact_match(["", ""], ["1", "2"], answer=["1", None])


def test_exact_match_non_numeric_reference_with_last_number_names_sample():
    with pytest.raises(ValueError, match="sample 0: 'answer' 'four' is not a number"):
        exact_match([""], ["4"], answer=["four"], extract="last_number")


def test_length_penalty_subtracts_coef_per_char_beyond_target():
    assert len(VADER_EXAMPLE) == 36
    scores = length_penalty(["", ""], [VADER_EXAMPLE, "Good."], target=30, coef=0.01)
    assert scores == [0.8316 - 0.01 * 6, sentiment([""], ["Good."])[0]]


def test_length_penalty_in_words_passes_fields_and_kwargs_to_base():
    scores = length_penalty(
        ["", "", ""],
        ["4", "so the answer is 4", "5"],
        base="rlfleet.reward.functions:exact_match",
        target=2,
        coef=0.25,
        unit="words",
        extract="last_number",
        answer=["4", "4", "4"],
    )
    assert scores == [1.0, 1.0 - 0.25 * 3, 0.0]


def test_length_penalty_rejects_unknown_unit():
    with pytest.raises(ValueError, match="unit must be 'chars' or 'words', got 'tokens'"):
        length_penalty([""], ["x"], target=1, coef=0.1, unit="tokens")


def test_length_penalty_rejects_negative_target_or_coef():
    with pytest.raises(ValueError, match="must be >= 0"):
        length_penalty([""], ["x"], target=1, coef=-0.1)


def test_load_function_returns_the_callable():
    assert load_function("rlfleet.reward.functions:sentiment") is sentiment


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("no_such_module_xyz:score", "cannot import 'no_such_module_xyz'"),
        ("rlfleet.reward.functions:nope", "has no attribute 'nope'"),
        ("rlfleet.reward.functions", "must look like 'package.module:function'"),
        (":sentiment", "must look like 'package.module:function'"),
        ("math:pi", "is not callable"),
    ],
)
def test_load_function_errors_name_the_spec(spec, reason):
    with pytest.raises(ValueError, match=re.escape(repr(spec))) as raised:
        load_function(spec)
    assert reason in str(raised.value)
