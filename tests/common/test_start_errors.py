"""An actor's constructor error taken out of Ray's report as one line, and when two are alike."""

from __future__ import annotations

import pytest
from ray.exceptions import ActorDiedError, RayTaskError

from rlfleet.common.start_errors import (
    ActorCannotStart,
    creation_error,
    exception_line,
    same_failure,
    stop_if_repeated,
)

RAY_REPORT = (
    "The actor died because of an error raised in its creation task, \x1b[36mray::GeneratorActor"
    ".__init__()\x1b[39m (pid=15931, ip=127.0.0.1, actor_id=9e60aeb5cd2c, repr=<GeneratorActor>)"
    "\n           ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^\n"
    '  File "/venv/vllm/v1/worker/cpu_worker.py", line 88, in determine_available_memory\n'
    "    raise ValueError(\n"
    "ValueError: Available memory on node 0 (22.44/23.54 GiB) on kv cache allocation is less "
    "than \x1b[1mrequested\x1b[0m memory for kv (10000.0 GiB).\n"
    "  a second line of the message"
)
"""What ``str()`` of Ray's ``ActorDiedError`` was for a generator whose engine could not allocate
its KV cache (cut short), ANSI colours included."""

KV_LINE = (
    "ValueError: Available memory on node 0 (22.44/23.54 GiB) on kv cache allocation is less than "
    "requested memory for kv (10000.0 GiB)."
)


def died_in_constructor(traceback_text: str) -> ActorDiedError:
    cause = RayTaskError("GeneratorActor.__init__", traceback_text, ValueError("x"))
    return ActorDiedError(cause)


def test_the_constructors_error_is_its_type_and_first_line_without_ansi_escapes() -> None:
    assert exception_line(RAY_REPORT) == KV_LINE


def test_a_chained_error_gives_the_last_exceptions_line_and_a_module_is_left_out() -> None:
    text = (
        "Traceback (most recent call last):\n"
        "  File \"a.py\", line 1, in f\n    g()\nKeyError: 'x'\n\n"
        "The above exception was the direct cause of the following exception:\n\n"
        "Traceback (most recent call last):\n"
        '  File "b.py", line 2, in __init__\n    raise Wrapped()\n'
        "huggingface_hub.errors.HFValidationError: Repo id must be in the form 'name'\n"
    )
    assert exception_line(text) == "HFValidationError: Repo id must be in the form 'name'"
    assert exception_line('  File "c.py", line 3, in h\n    boom()\nSystemExit\n') == "SystemExit"
    assert exception_line("no traceback here") is None


def test_only_an_actor_that_died_in_its_constructor_has_a_creation_error() -> None:
    traceback_text = (
        "Traceback (most recent call last):\n"
        '  File "driver_fakes.py", line 9, in __init__\n    raise fail_start\n'
        "OSError: \x1b[31mdisk full\x1b[0m\n"
    )
    assert creation_error(died_in_constructor(traceback_text)) == "OSError: disk full"
    assert creation_error(ActorDiedError()) is None  # died after it started, cause unknown
    assert creation_error(ValueError("raised in its creation task")) is None


def test_two_failures_are_alike_when_only_their_numbers_differ() -> None:
    other_reading = KV_LINE.replace("22.44", "21.97")
    assert same_failure(KV_LINE, other_reading)
    assert not same_failure(KV_LINE, None)
    assert not same_failure("ValueError: no such engine", "RuntimeError: no such engine")
    assert not same_failure("OSError: port 80 is taken", "OSError: disk full")


def test_a_failure_like_the_one_before_stops_naming_the_actor() -> None:
    stop_if_repeated("generator actor 0", KV_LINE, None)  # the first: start it again
    stop_if_repeated("generator actor 0", None, KV_LINE)  # died, but not in its constructor
    stop_if_repeated("generator actor 0", "OSError: disk full", KV_LINE)  # another failure
    with pytest.raises(ActorCannotStart) as stop:
        stop_if_repeated("generator actor 0", KV_LINE, KV_LINE.replace("22.44", "21.97"))
    assert str(stop.value) == f"generator actor 0 cannot start: {KV_LINE}"
