"""Finished multi-turn trajectories as rollout rows (``common.schema.ROLLOUT_SCHEMA``), and what
a generator needs to run them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from rlfleet.actors.rollout import Trajectory
from rlfleet.actors.turns import TurnTokens
from rlfleet.common.env_config import EnvConfig
from rlfleet.common.schema import with_columns


@dataclass(frozen=True)
class EnvSetup:
    """A multi-turn job's environment, as its generators see it."""

    config: EnvConfig
    actors: list[Any]
    """The environment actors' handles (Ray restarts a dead one behind the same handle)."""
    tools: list[dict[str, Any]] | None = None
    """The tools' JSON schemas for the chat template (None: a plain environment)."""


def trajectory_batch(
    batch: pa.RecordBatch, trajectories: list[Trajectory], turns: TurnTokens, version: int
) -> pa.RecordBatch:
    """The prompt batch with each row's trajectory: the prompt it started from, every id after
    it (sampled and observed) with its loss mask, the turns and their rewards."""
    return with_columns(
        batch,
        prompt=[turns.decode(t.prompt_ids) for t in trajectories],
        prompt_ids=[t.prompt_ids for t in trajectories],
        response=[turns.decode(t.response_ids) for t in trajectories],
        response_ids=[t.response_ids for t in trajectories],
        response_logprobs=[t.logprobs for t in trajectories],
        finish_reason=[t.finish_reason for t in trajectories],
        policy_version=[version] * len(trajectories),
        loss_mask=[t.loss_mask for t in trajectories],
        num_turns=[t.turns for t in trajectories],
        turn_ends=[t.turn_ends for t in trajectories],
        turn_rewards=[t.turn_rewards for t in trajectories],
        env_info=[t.env_info() for t in trajectories],
    )
