"""Batches the tests build: rollouts in the one Arrow schema (``common/schema.py``) as the
generators and reward actors return them, and the random queries, responses and scores of a
trainer step."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch

from rlfleet.common.schema import prompt_batch, with_columns


def rollout_batch(
    rollout_ids: Sequence[int],
    prompts: Sequence[str] | None = None,
    responses: Sequence[str | None] | None = None,
    metadata: Sequence[dict[str, Any]] | None = None,
    *,
    prompt_ids: Sequence[Sequence[int]] | None = None,
    response_ids: Sequence[Sequence[int]] | None = None,
    group_ids: Sequence[int] | None = None,
    **columns: Sequence[Any],
) -> pa.RecordBatch:
    """Generated rollouts waiting for their score (``ROLLOUT_SCHEMA``): prompt ``"p"`` of token
    ids ``[1, 2]`` and response ``"r"`` of ``[3]`` unless given, each rollout a group of its own
    unless ``group_ids`` says otherwise; ``columns`` set any other column by its name."""
    ids = list(rollout_ids)
    n = len(ids)
    batch = prompt_batch(
        ids,
        ["p"] * n if prompts is None else prompts,
        [[1, 2]] * n if prompt_ids is None else prompt_ids,
        metadata,
        group_ids,
    )
    return with_columns(
        batch,
        response=["r"] * n if responses is None else responses,
        response_ids=[[3]] * n if response_ids is None else response_ids,
        **columns,
    )


def scored_batch(
    rollout_ids: Sequence[int],
    scores: Sequence[float] | None = None,
    *,
    policy_version: int | Sequence[int] = 0,
    **fields: Any,
) -> pa.RecordBatch:
    """Rollouts as the reward actors return them: a ``rollout_batch`` (``fields`` are its
    arguments and columns) sampled with ``policy_version`` (one for all, or one per rollout) and
    scored ``scores`` (0.0 each unless given)."""
    n = len(rollout_ids)
    versions = [policy_version] * n if isinstance(policy_version, int) else policy_version
    return rollout_batch(
        rollout_ids,
        policy_version=versions,
        score=[0.0] * n if scores is None else scores,
        **fields,
    )


Lengths = int | tuple[int, int] | Callable[[int], int]
"""How many tokens each sequence of a ``ppo_step_batch`` has: one number for all, a ``(low,
high)`` range to draw each from (before its tokens), or a function of the sample's index."""


def ppo_step_batch(
    seed: int | torch.Generator,
    size: int = 4,
    *,
    vocab: int = 600,
    query_lengths: Lengths = 5,
    response_lengths: Lengths | None = None,
    scores: Sequence[float] | None = None,
    rng: Literal["torch", "numpy"] = "torch",
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """``size`` random ``(queries, responses, scores)`` for a trainer step, drawn in that order
    from one generator: torch's seeded with ``seed`` (a ``torch.Generator`` given goes on drawing
    from where it is), or with ``rng="numpy"`` numpy's ``default_rng(seed)``. Token ids lie in
    ``[1, vocab)``; responses have ``3 + i`` tokens unless ``response_lengths`` says otherwise;
    scores are drawn standard normal unless given."""
    if rng == "numpy":
        numbers = np.random.default_rng(seed)

        def tokens(n: Any) -> torch.Tensor:
            return torch.tensor(numbers.integers(1, vocab, n))

        def drawn(low: int, high: int) -> Any:
            return numbers.integers(low, high)

        def normal() -> list[torch.Tensor]:
            return [torch.tensor(float(s)) for s in numbers.standard_normal(size)]

    else:
        generator = seed if isinstance(seed, torch.Generator) else torch.Generator()
        if not isinstance(seed, torch.Generator):
            generator.manual_seed(seed)

        def tokens(n: Any) -> torch.Tensor:
            return torch.randint(1, vocab, (n,), generator=generator)

        def drawn(low: int, high: int) -> Any:
            return int(torch.randint(low, high, (), generator=generator))

        def normal() -> list[torch.Tensor]:
            return [torch.randn((), generator=generator) for _ in range(size)]

    def sequences(lengths: Lengths) -> list[torch.Tensor]:
        drawn_tokens = []
        for i in range(size):
            if isinstance(lengths, tuple):
                length = drawn(*lengths)
            elif callable(lengths):
                length = lengths(i)
            else:
                length = lengths
            drawn_tokens.append(tokens(length))
        return drawn_tokens

    queries = sequences(query_lengths)
    responses = sequences((lambda i: 3 + i) if response_lengths is None else response_lengths)
    score_tensors = normal() if scores is None else [torch.tensor(float(s)) for s in scores]
    return queries, responses, score_tensors
