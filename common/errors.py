"""Errors as one line, for messages that name what failed without a traceback."""

from __future__ import annotations

import reprlib
from typing import Any


def original_error(error: BaseException) -> BaseException:
    """The error a remote call raised, when ``error`` is Ray's ``RayTaskError`` around it (what
    ``ray.get`` raises; its own text starts with the task's name and a traceback); else
    ``error``."""
    from ray.exceptions import RayTaskError

    while isinstance(error, RayTaskError) and isinstance(error.cause, BaseException):
        error = error.cause
    return error


def first_line(error: BaseException | str) -> str:
    """The first non-blank line of an error's message, or of a text, stripped. An error with no
    message gives its type's name; a remote call's error (``RayTaskError``) gives its original
    error's first line."""
    if isinstance(error, str):
        text = error
    else:
        error = original_error(error)
        text = str(error)
    lines = (line.strip() for line in text.splitlines())
    line = next((line for line in lines if line), "")
    return line or ("" if isinstance(error, str) else type(error).__name__)


def error_line(error: BaseException) -> str:
    """``Type: first line`` of ``error`` (of the original error, for a remote call's), or its
    type's name alone when it has no message."""
    error = original_error(error)
    message = first_line(str(error))
    return f"{type(error).__name__}: {message}" if message else type(error).__name__


def one_line(error: BaseException) -> str:
    """An error's whole message on one line (whitespace runs, newlines included, become one
    space); its type's name when it has no message."""
    return " ".join(str(error).split()) or type(error).__name__


def shown(value: Any, limit: int = 80) -> str:
    """``repr(value)`` for a message, at most ``limit`` characters: a user's value is never
    written out whole (a long string or a deep structure is cut, without building its whole
    repr first)."""
    text = _SHORT_REPR.repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


_SHORT_REPR = reprlib.Repr()
_SHORT_REPR.maxlevel = 3
_SHORT_REPR.maxstring = _SHORT_REPR.maxother = _SHORT_REPR.maxlong = 80
_SHORT_REPR.maxdict = _SHORT_REPR.maxlist = _SHORT_REPR.maxtuple = _SHORT_REPR.maxset = 6
