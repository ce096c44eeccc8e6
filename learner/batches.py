"""Scored rollout batches (Arrow, ``common.schema.ROLLOUT_SCHEMA``) to the tensors a trainer's
``step`` takes, and a step's stats back to plain numbers.

What every trainer's inputs are made of is here; which of them a trainer takes, and how its
stats are named, is its spec's (learner/registry.py).
"""

from __future__ import annotations

import math
from numbers import Number
from typing import Any

import numpy as np
import pyarrow as pa
import torch


def rollout_tensors(
    batch: pa.RecordBatch,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """``(queries, responses, scores)`` as a trainer's ``step`` takes them; names a bad
    rollout."""
    columns = batch.to_pydict()
    queries, responses, scores = [], [], []
    for rollout_id, prompt_ids, response_ids, logprobs, score in zip(
        columns["rollout_id"],
        columns["prompt_ids"],
        columns["response_ids"],
        columns["response_logprobs"],
        columns["score"],
        strict=True,
    ):
        if not prompt_ids or not response_ids:
            raise ValueError(f"rollout {rollout_id}: empty prompt_ids or response_ids")
        if logprobs is None or len(logprobs) != len(response_ids):
            count = "no" if logprobs is None else len(logprobs)
            raise ValueError(
                f"rollout {rollout_id}: {count} response_logprobs for {len(response_ids)} tokens"
            )
        if score is None or not math.isfinite(score):
            raise ValueError(f"rollout {rollout_id}: score is {score!r}, not a finite number")
        queries.append(torch.tensor(prompt_ids, dtype=torch.long))
        responses.append(torch.tensor(response_ids, dtype=torch.long))
        scores.append(torch.tensor(score, dtype=torch.float32))
    return queries, responses, scores


def generator_logprobs(batch: pa.RecordBatch) -> list[torch.Tensor]:
    """Each rollout's per-token logprobs from the generator that sampled it (the behaviour
    policy), as float32 tensors."""
    return [
        torch.tensor(logprobs, dtype=torch.float32)
        for logprobs in batch.column("response_logprobs").to_pylist()
    ]


def truncated_flags(batch: pa.RecordBatch) -> list[bool]:
    """Which rollouts ``max_new_tokens`` cut off (finish reason ``length``)."""
    return [reason == "length" for reason in batch.column("finish_reason").to_pylist()]


def truncated_fraction(batch: pa.RecordBatch) -> float:
    truncated = truncated_flags(batch)
    return sum(truncated) / len(truncated)


def grouped(batch: pa.RecordBatch) -> pa.RecordBatch:
    """The batch with the samples of each group next to each other (shards may split a group),
    in the order the groups and their samples came in otherwise."""
    order = np.argsort(batch.column("group_id").to_numpy(), kind="stable")
    return batch.take(pa.array(order))


def generator_mismatch_stats(batch: pa.RecordBatch, old_logprobs: np.ndarray) -> dict[str, float]:
    """How the generators' rollouts compare with the learner.

    ``rollout/logprob_diff_mean``: the mean over response tokens of |learner's old-policy logprob
    - generator's logprob| (``old_logprobs``: ``[batch, max response length]`` in batch order,
    PPO's ``objective/logprobs``); near zero when both hold the same weights, it grows with
    policy lag and with any mismatch between the engine and the learner.
    ``rollout/truncated_fraction``: the fraction of rollouts that ``max_new_tokens`` cut off.
    """
    generator = batch.column("response_logprobs").to_pylist()
    old = np.asarray(old_logprobs, dtype=np.float64).reshape(len(generator), -1)
    differences = np.concatenate(
        [np.abs(old[row, : len(lps)] - lps) for row, lps in enumerate(generator)]
    )
    return {
        "rollout/logprob_diff_mean": float(differences.mean()),
        "rollout/truncated_fraction": truncated_fraction(batch),
    }


def scalar_stats(stats: dict[str, Any]) -> dict[str, float]:
    """The single-number entries of a TRL stats dict, as floats (histograms are dropped)."""
    scalars = {}
    for name, value in stats.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        if isinstance(value, np.ndarray) and value.size == 1:
            value = value.item()
        if isinstance(value, Number) and not isinstance(value, bool):
            scalars[name] = float(value)
    return scalars
