"""Reward functions for job tests (imported by reward workers: tests/ is on their PYTHONPATH)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def word_parity(prompts: Sequence[str], responses: Sequence[str], **_: Any) -> list[float]:
    """1.0 for a response of an odd number of words, else 0.0: two samples of a prompt score
    alike about half the time (the groups dynamic sampling drops)."""
    return [float(len(response.split()) % 2) for response in responses]
