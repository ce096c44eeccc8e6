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
    endpoint_token: str | None = None
    """An agent job's (``config.agent``): the secret of the generators' endpoints."""


def trajectory_batch(
    batch: pa.RecordBatch, trajectories: list[Trajectory], turns: TurnTokens, multi_turn: bool
) -> pa.RecordBatch:
    """The prompt batch with each row's trajectory: the prompt it started from, every id after
    it with the policy version that sampled it, and for a ``multi_turn`` one each id's loss mask
    (sampled or observed), the turns and their rewards. A row's ``policy_version`` is the oldest
    of its tokens'."""
    columns = {
        "response_ids": [t.response_ids for t in trajectories],
        "response_logprobs": [t.logprobs for t in trajectories],
        "finish_reason": [t.finish_reason for t in trajectories],
        "policy_version": [min(t.versions, default=0) for t in trajectories],
        "token_versions": [t.versions for t in trajectories],
    }
    if not multi_turn:
        responses = turns.decode_responses(columns["response_ids"])
        return with_columns(batch, response=responses, **columns)
    return with_columns(
        batch,
        prompt=[turns.decode(t.prompt_ids) for t in trajectories],
        prompt_ids=[t.prompt_ids for t in trajectories],
        response=[turns.decode(t.response_ids) for t in trajectories],
        **columns,
        loss_mask=[t.loss_mask for t in trajectories],
        num_turns=[t.turns for t in trajectories],
        turn_ends=[t.turn_ends for t in trajectories],
        turn_rewards=[t.turn_rewards for t in trajectories],
        env_info=[t.env_info() for t in trajectories],
    )
