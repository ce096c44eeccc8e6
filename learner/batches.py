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


def multi_turn_inputs(batch: pa.RecordBatch) -> dict[str, list[torch.Tensor]]:
    """A multi-turn batch's ``loss_masks`` and, when any turn reward is non-zero,
    ``token_rewards`` (each rollout's ``turn_rewards`` at its ``turn_ends``) as a trainer's
    ``step`` takes them; nothing for a single-turn batch (every ``loss_mask`` null). A null row
    in a multi-turn batch is all ones. One line naming the rollout on a mismatch."""
    columns = batch.select(["rollout_id", "response_ids", "loss_mask", "turn_ends", "turn_rewards"])
    rows = columns.to_pylist()
    if all(row["loss_mask"] is None for row in rows):
        return {}
    loss_masks, token_rewards = [], []
    for row in rows:
        mask = checked_loss_mask(row)
        loss_masks.append(torch.tensor(mask, dtype=torch.long))
        token_rewards.append(placed_turn_rewards(row, mask))
    inputs = {"loss_masks": loss_masks}
    if any(bool(rewards.any()) for rewards in token_rewards):
        inputs["token_rewards"] = token_rewards
    return inputs


def checked_loss_mask(row: dict[str, Any]) -> list[int]:
    """The rollout's loss mask (all ones when null): one 0 or 1 per response token (all 0: a
    dropped agent trajectory, trained on nothing)."""
    rollout_id, length = row["rollout_id"], len(row["response_ids"] or [])
    mask = row["loss_mask"]
    if mask is None:
        return [1] * length
    if len(mask) != length:
        raise ValueError(f"rollout {rollout_id}: {len(mask)} loss_mask entries for {length} tokens")
    if any(value not in (0, 1) for value in mask):
        raise ValueError(f"rollout {rollout_id}: loss_mask must hold 0s and 1s")
    return mask


def placed_turn_rewards(row: dict[str, Any], mask: list[int]) -> torch.Tensor:
    """The rollout's turn rewards on a response-long float32 vector, each at its turn's end (a
    token of the policy's), 0 elsewhere."""
    rollout_id, ends, rewards = row["rollout_id"], row["turn_ends"], row["turn_rewards"]
    placed = torch.zeros(len(mask), dtype=torch.float32)
    if rewards is None:
        return placed
    if ends is None or len(ends) != len(rewards):
        count = "no" if ends is None else len(ends)
        raise ValueError(f"rollout {rollout_id}: {len(rewards)} turn_rewards for {count} turn_ends")
    for end, reward in zip(ends, rewards, strict=True):
        if not 0 <= end < len(mask) or mask[end] != 1:
            raise ValueError(
                f"rollout {rollout_id}: turn end {end} is not a sampled token (loss_mask 1) of "
                f"its {len(mask)} response tokens"
            )
        if reward is None or not math.isfinite(reward):
            raise ValueError(f"rollout {rollout_id}: turn reward {reward!r} is not finite")
        placed[end] += reward
    return placed


def loss_masks_of(batch: pa.RecordBatch) -> list[list[int] | None]:
    """Each rollout's loss mask, None for a single-turn one (every token counts)."""
    return batch.column("loss_mask").to_pylist()


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

    ``rollout/logprob_diff_mean``: the mean over the sampled response tokens (mask-1 ones of a
    multi-turn rollout) of |learner's old-policy logprob - generator's logprob|
    (``old_logprobs``: ``[batch, max response length]`` in batch order, PPO's
    ``objective/logprobs``); near zero when both hold the same weights, it grows with policy lag
    and with any mismatch between the engine and the learner.
    ``rollout/truncated_fraction``: the fraction of rollouts that ``max_new_tokens`` cut off.
    """
    generator = batch.column("response_logprobs").to_pylist()
    old = np.asarray(old_logprobs, dtype=np.float64).reshape(len(generator), -1)
    differences = np.concatenate(
        [
            np.abs(old[row, : len(lps)] - lps)[sampled(mask, len(lps))]
            for row, (lps, mask) in enumerate(zip(generator, loss_masks_of(batch), strict=True))
        ]
    )
    return {
        "rollout/logprob_diff_mean": float(differences.mean()),
        "rollout/truncated_fraction": truncated_fraction(batch),
    }


STALENESS_BUCKETS = 4
"""``rollout/staleness_{k}`` counts the rollouts ``k`` versions behind for ``k`` below this, and
``rollout/staleness_{STALENESS_BUCKETS}plus`` the rest."""


def staleness_stats(batch: pa.RecordBatch, learner_version: int) -> dict[str, float]:
    """How stale a batch is for the learner at ``learner_version`` (before its step): each
    rollout's lag is that minus its ``policy_version`` (0: sampled with the current weights,
    ``one_step_off``'s 1, more with an asynchronous fleet). ``rollout/staleness_mean`` and
    ``_max``, and a histogram: the count of rollouts at each lag (a fixed set of keys, so that
    every step's line has them all)."""
    versions = batch.column("policy_version").to_pylist()
    if any(version is None for version in versions):
        raise ValueError("staleness: a rollout has no policy_version")
    lags = np.asarray([learner_version - version for version in versions], dtype=np.int64)
    counts = np.bincount(
        np.minimum(lags.clip(min=0), STALENESS_BUCKETS), minlength=STALENESS_BUCKETS + 1
    )
    stats = {
        "rollout/staleness_mean": float(lags.mean()),
        "rollout/staleness_max": float(lags.max()),
    }
    stats.update({f"rollout/staleness_{k}": float(counts[k]) for k in range(STALENESS_BUCKETS)})
    stats[f"rollout/staleness_{STALENESS_BUCKETS}plus"] = float(counts[STALENESS_BUCKETS])
    return stats


def sampled(mask: list[int] | None, length: int) -> np.ndarray:
    """Which of a rollout's ``length`` tokens the policy sampled (all, without a loss mask)."""
    return np.ones(length, dtype=bool) if mask is None else np.asarray(mask, dtype=bool)


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
