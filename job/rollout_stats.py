"""The statistics of a scored rollout batch: its rewards, the same math for the training
iteration's stats line (``reward_mean`` ...) and for held-out evaluation's
(``eval/reward_mean`` ...); and a multi-turn batch's trajectories (``env/*``)."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa


def component_means(batch: pa.RecordBatch) -> dict[str, float]:
    """``reward/<name>_mean`` for each named reward component scored in ``batch``."""
    scores: dict[str, list[float]] = {}
    for row in batch.column("score_components").to_pylist():
        for name, score in row or ():
            scores.setdefault(name, []).append(score)
    return {f"reward/{name}_mean": float(np.mean(values)) for name, values in scores.items()}


def returns(batch: pa.RecordBatch) -> np.ndarray:
    """Each sample's reward as the learner trains on it: its score plus, for a multi-turn
    trajectory, its environment's turn rewards."""
    scores = np.asarray(batch.column("score").to_pylist(), dtype=np.float64)
    turn_rewards = batch.column("turn_rewards").to_pylist()
    return scores + np.asarray([sum(rewards or ()) for rewards in turn_rewards], dtype=np.float64)


def reward_stats(batch: pa.RecordBatch) -> dict[str, Any]:
    """``reward_mean``, ``reward_std`` (population) of the samples' rewards (``returns``: with a
    multi-turn job's environment rewards), each component's mean and ``response_length_mean``
    (tokens) of a scored batch."""
    scores = returns(batch)
    lengths = [len(ids) for ids in batch.column("response_ids").to_pylist()]
    return {
        "reward_mean": float(scores.mean()),
        "reward_std": float(scores.std()),
        **component_means(batch),
        "response_length_mean": float(np.mean(lengths)),
    }


FINISH_REASONS = (
    "stop",
    "length",
    "max_turns",
    "env_timeout",
    "env_error",
    "agent_error",
    "agent_timeout",
    "agent_no_calls",
)
"""An agent job's dropped trajectories end with ``agent_*`` (actors/agent_rollout.py)."""
DROPPED = ("agent_error", "agent_timeout", "agent_no_calls")
"""How a multi-turn trajectory ends (actors/rollout.py)."""


@dataclass
class TrajectorySummary:
    """A multi-turn batch's trajectories in numbers (``of``: None for a single-turn batch):
    stats.jsonl's ``env/*`` keys (``stats``) and the driver's Prometheus metrics."""

    turns: list[int]
    step_seconds: list[float]
    tool_calls: Counter
    tool_errors: Counter
    finish_reasons: Counter
    counters: Counter
    """``malformed_tool_calls``, ``truncated_observations``, ``rerender_mismatches``,
    ``restarts`` summed over the trajectories."""
    masked_tokens: int
    tokens: int
    turn_rewards: list[float]
    dropped: dict[int, str] = field(default_factory=dict)
    """Dropped agent trajectories (not trained): rollout id -> why (one line)."""

    @classmethod
    def of(cls, batch: pa.RecordBatch) -> TrajectorySummary | None:
        if batch.column("loss_mask").null_count == batch.num_rows:
            return None
        summary = cls([], [], Counter(), Counter(), Counter(), Counter(), 0, 0, [])
        columns = batch.select(
            ["rollout_id", "num_turns", "env_info", "finish_reason", "loss_mask"]
        )
        rewards = batch.column("turn_rewards").to_pylist()
        for row, turn_rewards in zip(columns.to_pylist(), rewards, strict=True):
            info = json.loads(row["env_info"] or "{}")
            summary.turns.append(row["num_turns"] or 0)
            summary.step_seconds += info.get("step_seconds", [])
            summary.tool_calls.update(info.get("tool_calls", {}))
            summary.tool_errors.update(info.get("tool_errors", {}))
            summary.finish_reasons[row["finish_reason"]] += 1
            for key in COUNTED:
                summary.counters[key] += int(info.get(key, 0))
            mask = row["loss_mask"] or []
            summary.masked_tokens += len(mask) - sum(mask)
            summary.tokens += len(mask)
            summary.turn_rewards.append(float(sum(turn_rewards or [])))
            if row["finish_reason"] in DROPPED:
                why = info.get("error", "")
                summary.dropped[row["rollout_id"]] = f"{row['finish_reason']}: {why}"
        return summary

    def dropped_line(self, iteration: int, named: int = 3) -> str | None:
        """One line naming the iteration's dropped trajectories (the first ``named`` with
        why), or None when none was dropped."""
        if not self.dropped:
            return None
        shown = "; ".join(
            f"rollout {rid}: {why}" for rid, why in sorted(self.dropped.items())[:named]
        )
        more = len(self.dropped) - named
        return (
            f"iteration {iteration}: {len(self.dropped)} agent trajectories dropped (not "
            f"trained): {shown}"
            + (f"; and {more} more (stats.jsonl env/dropped_rollout_ids)" if more > 0 else "")
        )

    def stats(self) -> dict[str, float]:
        steps = self.step_seconds or [0.0]
        return {
            "env/turns_mean": float(np.mean(self.turns)),
            "env/turns_p95": float(np.percentile(self.turns, 95)),
            "env/step_seconds_mean": float(np.mean(steps)),
            "env/step_seconds_p95": float(np.percentile(steps, 95)),
            "env/return_mean": float(np.mean(self.turn_rewards)),
            "env/masked_token_fraction": self.masked_tokens / max(self.tokens, 1),
            **{f"env/finished_{reason}": self.finish_reasons[reason] for reason in FINISH_REASONS},
            **{f"env/{key}": self.counters[key] for key in COUNTED},
            **{f"env/tool_calls/{tool}": n for tool, n in sorted(self.tool_calls.items())},
            **{f"env/tool_errors/{tool}": n for tool, n in sorted(self.tool_errors.items())},
            **({"env/dropped_rollout_ids": sorted(self.dropped)} if self.dropped else {}),
        }


COUNTED = (
    "malformed_tool_calls",
    "truncated_observations",
    "rerender_mismatches",
    "restarts",
    "agent_calls",
    "split_calls",
)
"""``agent_calls``: an agent job's endpoint calls; ``split_calls``: those left out because the
trajectory split (actors/agent_calls.py)."""
