from __future__ import annotations

import pytest
from ray.exceptions import ActorDiedError, RayTaskError

from rlfleet.common.errors import error_line, first_line, one_line


def remote_error(cause: BaseException) -> BaseException:
    """What ``ray.get`` raises when the remote call raised ``cause``."""
    error = RayTaskError(
        "Actor.method",
        f"Traceback (most recent call last):\n  ...\n{type(cause).__name__}: {cause}",
        cause,
        proctitle="ray::Actor.method",
    )
    return error.as_instanceof_cause()


@pytest.mark.parametrize(
    ("error", "line"),
    [
        ("one\ntwo", "one"),
        ("\n  \n  first  \nlast\n", "first"),
        ("", ""),
        (ValueError("\n\tbad value\ntraceback follows"), "bad value"),
        (ValueError(), "ValueError"),
        (ValueError(" \n "), "ValueError"),
    ],
)
def test_first_line_is_the_first_non_blank_line(error: BaseException | str, line: str) -> None:
    assert first_line(error) == line


def test_a_remote_calls_error_is_read_from_the_error_it_raised() -> None:
    error = remote_error(TypeError("weights['x'] is a list\nmore"))
    assert "ray::Actor.method()" in first_line(str(error))  # Ray's own text: not the message
    assert first_line(error) == "weights['x'] is a list"
    assert error_line(error) == "TypeError: weights['x'] is a list"
    assert error_line(remote_error(remote_error(KeyError()))) == "KeyError"


def test_error_line_names_the_type() -> None:
    assert error_line(RuntimeError("reset\nby peer")) == "RuntimeError: reset"
    assert error_line(RuntimeError()) == "RuntimeError"
    died = ActorDiedError()
    died.error_msg = f"{ActorDiedError.BASE_ERROR_MSG}\n\tclass_name: LearnerActor"
    assert error_line(died) == (
        "ActorDiedError: The actor died unexpectedly before finishing this task."
    )


def test_one_line_keeps_the_whole_message() -> None:
    assert one_line(OSError("no space\n  left on\tdevice")) == "no space left on device"
    assert one_line(OSError()) == "OSError"
