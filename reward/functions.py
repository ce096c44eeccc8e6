"""Built-in reward functions and the loader for ``"module:function"`` reward specs.

A reward function is ``fn(prompts: list[str], responses: list[str], **kwargs) -> list[float]``:
one score per (prompt, response) pair. ``kwargs`` holds the job config's ``reward.kwargs`` plus
one list per extra dataset field (one value per sample, ``None`` where a row lacks the field),
so every reward function must accept ``**kwargs`` even when it uses none of them. With a chat
dataset (``dataset.messages_field``), ``messages`` is each sample's conversation (a list of
``{"role", "content"}`` messages, the system prompt included), ``prompts`` are the conversations
as rendered by the chat template and ``responses`` the completions' text without the
end-of-turn token.
"""

from __future__ import annotations

import importlib
import re
import threading
from collections.abc import Callable, Sequence
from decimal import Decimal, InvalidOperation
from functools import cache
from typing import Any, Literal

from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

RewardFunction = Callable[..., Sequence[float]]

_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*)?\.?\d+(?:[eE][-+]?\d+)?")


LEGACY_MODULES = ("reward.functions",)
"""Built-in modules by their name before the ``rlfleet`` namespace: configs written as
``reward.functions:sentiment`` keep working."""


def load_function(spec: str) -> RewardFunction:
    """The callable named by ``"package.module:function"``; a clear ``ValueError`` otherwise."""
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"reward function {spec!r} must look like 'package.module:function'")
    if module_name in LEGACY_MODULES:
        module_name = f"rlfleet.{module_name}"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"reward function {spec!r}: cannot import {module_name!r}: {exc}") from exc
    try:
        function = getattr(module, attribute)
    except AttributeError as exc:
        raise ValueError(
            f"reward function {spec!r}: module {module_name!r} has no attribute {attribute!r}"
        ) from exc
    if not callable(function):
        raise ValueError(
            f"reward function {spec!r} is not callable (it is a {type(function).__name__})"
        )
    return function


@cache
def _vader() -> SentimentIntensityAnalyzer:
    return SentimentIntensityAnalyzer()


def sentiment(prompts: Sequence[str], responses: Sequence[str], **_: Any) -> list[float]:
    """VADER's compound sentiment score of each response, in [-1, 1].

    The prompt is not scored: it comes from the dataset and the policy cannot change it, so its
    sentiment would only shift and, because VADER's compound score saturates, dampen the signal
    the policy is trained on. Uses the lexicon shipped inside ``vaderSentiment`` (offline).
    """
    analyzer = _vader()
    return [analyzer.polarity_scores(response)["compound"] for response in responses]


def _normalise_text(text: str, case_sensitive: bool) -> str:
    """Whitespace collapsed, surrounding whitespace and trailing ``.!?`` dropped."""
    text = " ".join(text.split()).rstrip(".!?").strip()
    return text if case_sensitive else text.casefold()


def _parse_number(text: str) -> Decimal | None:
    try:
        return Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None


def _extract(response: str, pattern: re.Pattern[str] | None) -> str | None:
    """The last match of ``pattern`` in ``response`` (its first group if it has one)."""
    if pattern is None:
        return response
    matches = list(pattern.finditer(response))
    if not matches:
        return None
    last = matches[-1]
    return last.group(1) if pattern.groups else last.group(0)


def _reference_answers(
    function: str, fields: dict[str, Sequence[Any]], answer_field: str, responses: int
) -> Sequence[Any]:
    """The per-sample reference answers ``fields[answer_field]``, one per response; an error
    naming ``function`` when the field is missing or its length is off."""
    if answer_field not in fields:
        raise ValueError(
            f"{function} needs the reference answers in field {answer_field!r}; "
            f"got fields {sorted(fields)}"
        )
    answers = fields[answer_field]
    if len(answers) != responses:
        raise ValueError(
            f"{function}: {len(answers)} values in {answer_field!r} for {responses} responses"
        )
    return answers


def environment_only(prompts: Sequence[str], responses: Sequence[str], **_: Any) -> list[float]:
    """0.0 for every sample: for a multi-turn job whose environment's turn rewards (``Step``'s
    ``reward``, added to the score by the learner) are the whole reward."""
    return [0.0] * len(responses)


def exact_match(
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    answer_field: str = "answer",
    extract: str | None = None,
    case_sensitive: bool = False,
    **fields: Sequence[Any],
) -> list[float]:
    """1.0 where the response's answer equals the sample's reference answer, else 0.0.

    The reference answers are the per-sample list ``fields[answer_field]`` (the dataset rows'
    ``answer`` field by default). ``extract`` picks the answer out of the response: ``None``
    compares the whole response, ``"last_number"`` compares the last number in it numerically
    (``"1,000.0"`` equals ``1000``), any other string is a regex whose last match (its first
    group, if it has groups) is compared. Texts are compared after collapsing whitespace,
    dropping trailing ``.!?`` and, unless ``case_sensitive``, case. A response without a match
    scores 0.0; a sample without a reference answer is an error naming it.
    """
    answers = _reference_answers("exact_match", fields, answer_field, len(responses))
    numeric = extract == "last_number"
    pattern = _NUMBER if numeric else (re.compile(extract) if extract else None)
    scores = []
    for index, (response, reference) in enumerate(zip(responses, answers, strict=True)):
        if reference is None:
            raise ValueError(f"exact_match: sample {index} has no {answer_field!r}")
        found = _extract(response, pattern)
        if numeric:
            expected = _parse_number(str(reference))
            if expected is None:
                raise ValueError(
                    f"exact_match: sample {index}: {answer_field!r} {reference!r} is not a number"
                )
            matched = found is not None and _parse_number(found) == expected
        else:
            matched = found is not None and _normalise_text(
                found, case_sensitive
            ) == _normalise_text(str(reference), case_sensitive)
        scores.append(1.0 if matched else 0.0)
    return scores


_INTEGER = re.compile(r"[-+]?\d+")


def _first_integer(text: str) -> int | None:
    match = _INTEGER.search(text)
    return None if match is None else int(match.group(0))


def _integer_answer(value: Any, index: int, answer_field: str) -> int:
    """The reference answer as an ``int`` (``19``, ``"19"``, ``19.0``); an error naming the
    sample otherwise."""
    try:
        number = Decimal(str(value).strip())
    except InvalidOperation:
        number = None
    integral = number is not None and number.is_finite() and number == number.to_integral()
    if value is None or isinstance(value, bool) or not integral:
        raise ValueError(
            f"arithmetic_correct: sample {index}: {answer_field!r} {value!r} is not an integer"
        )
    return int(number)


def arithmetic_correct(
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    answer_field: str = "answer",
    **fields: Sequence[Any],
) -> list[float]:
    """1.0 where the first integer in the response equals the sample's answer, else 0.0.

    The verifiable reward of the GRPO example (``examples/grpo_arithmetic.yaml``): the answer
    is the first integer written (``"19"``, ``" 19 because"``, ``"19.5"`` all read 19), compared
    exactly; a response with no digits scores 0.0. The reference answers are the per-sample
    list ``fields[answer_field]``; a missing or non-integer one is an error naming the sample.
    """
    answers = _reference_answers("arithmetic_correct", fields, answer_field, len(responses))
    scores = []
    for index, (response, reference) in enumerate(zip(responses, answers, strict=True)):
        expected = _integer_answer(reference, index, answer_field)
        scores.append(1.0 if _first_integer(response) == expected else 0.0)
    return scores


def _length(text: str, unit: Literal["chars", "words"]) -> int:
    return len(text) if unit == "chars" else len(text.split())


def length_penalty(
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    base: str = "rlfleet.reward.functions:sentiment",
    target: int,
    coef: float,
    unit: Literal["chars", "words"] = "chars",
    **base_kwargs: Any,
) -> list[float]:
    """The ``base`` reward minus ``coef`` per response unit beyond ``target``.

    ``score = base_score - coef * max(0, length - target)``, length in characters or
    whitespace-separated words of the response. Every other keyword (config kwargs and dataset
    fields) goes to the base function. From a job config::

        reward:
          function: rlfleet.reward.functions:length_penalty
          kwargs: {base: "rlfleet.reward.functions:sentiment", target: 64, coef: 0.01}
    """
    if unit not in ("chars", "words"):
        raise ValueError(f"length_penalty: unit must be 'chars' or 'words', got {unit!r}")
    if target < 0 or coef < 0:
        raise ValueError(f"length_penalty: target and coef must be >= 0, got {target}, {coef}")
    base_scores = list(load_function(base)(prompts, responses, **base_kwargs))
    if len(base_scores) != len(responses):
        raise ValueError(
            f"length_penalty: base {base!r} returned {len(base_scores)} scores "
            f"for {len(responses)} responses"
        )
    return [
        score - coef * max(0, _length(response, unit) - target)
        for score, response in zip(base_scores, responses, strict=True)
    ]


MATH_VERIFY_TIMEOUT_S = 5
"""math-verify's own default bound, in whole seconds, on each parse and each comparison."""

_GSM8K_FINAL = re.compile(r"####([^\n]*)")


@cache
def _math_verify_api() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``math_verify.parse`` and ``verify``, imported on first use: the import pulls in SymPy
    (a second or more), which the other reward functions' workers need not pay."""
    from math_verify import parse, verify

    return parse, verify


def _final_answer(text: str) -> str:
    """What follows the last ``####`` on its line (GSM8K's final-answer mark), else ``text``."""
    matches = _GSM8K_FINAL.findall(text)
    return matches[-1] if matches else text


def _as_latex_answer(reference: Any) -> str:
    """A reference answer as math-verify reads gold answers best: GSM8K's final answer, and a
    bare one (``72``, ``\\frac{1}{2}``, ``x^2+1``) put in ``\\boxed{}`` so it parses as LaTeX."""
    text = _final_answer(str(reference)).strip()
    return text if "\\boxed" in text or "$" in text else f"\\boxed{{{text}}}"


def _signal_timeout(timeout_s: int | None) -> int | None:
    """``timeout_s`` where math-verify's SIGALRM bound can work (a process's main thread: the
    reward worker calls functions there), None elsewhere: ``signal`` refuses other threads, and
    the scorer's ``reward.timeout_s`` (the worker killed) bounds the call there."""
    if timeout_s is not None and (isinstance(timeout_s, bool) or not isinstance(timeout_s, int)):
        raise ValueError(f"math_verify: timeout_s must be whole seconds or None, got {timeout_s!r}")
    if timeout_s is not None and timeout_s <= 0:
        raise ValueError(f"math_verify: timeout_s must be positive or None, got {timeout_s}")
    return timeout_s if threading.current_thread() is threading.main_thread() else None


def math_verify(
    prompts: Sequence[str],
    responses: Sequence[str],
    *,
    answer_field: str = "answer",
    timeout_s: int | None = MATH_VERIFY_TIMEOUT_S,
    **fields: Sequence[Any],
) -> list[float]:
    """1.0 where the response's final answer equals the sample's reference answer as mathematics
    (``math-verify``: ``0.5``, ``1/2`` and ``\\frac{1}{2}`` are equal, so are ``(x+1)^2`` and
    ``x^2+2x+1``), else 0.0; a response without an answer scores 0.0.

    The response's answer is what follows its last ``####`` (GSM8K's format) if it has one, else
    what math-verify extracts from it: a ``\\boxed{...}`` first, then an "answer is ...", then
    the last expression. The reference answers are the per-sample list ``fields[answer_field]``:
    a GSM8K solution (its ``#### 72``), a MATH answer (``\\frac{\\sqrt{3}}{2}``, with or without
    ``\\boxed{}`` or ``$...$``) or a number; a missing one, or one math-verify cannot read, is an
    error naming the sample. ``timeout_s`` bounds each parse and comparison (math-verify's
    SIGALRM, whole seconds; a sample past it scores 0.0) where a signal can: see
    :func:`_signal_timeout`. The first call imports SymPy.
    """
    answers = _reference_answers("math_verify", fields, answer_field, len(responses))
    timeout = _signal_timeout(timeout_s)
    parse, verify = _math_verify_api()
    scores = []
    for index, (response, reference) in enumerate(zip(responses, answers, strict=True)):
        if reference is None:
            raise ValueError(f"math_verify: sample {index} has no {answer_field!r}")
        gold = parse(_as_latex_answer(reference), parsing_timeout=timeout)
        if not gold:
            raise ValueError(
                f"math_verify: sample {index}: {answer_field!r} {reference!r} is not an answer "
                "math-verify can read"
            )
        answer = parse(_final_answer(response), parsing_timeout=timeout)
        matched = bool(answer) and verify(gold, answer, timeout_seconds=timeout)
        scores.append(1.0 if matched else 0.0)
    return scores
