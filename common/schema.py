"""The one Arrow schema for rollouts travelling between actors.

Generators fill every column but ``score``; reward actors return the same batch with ``score``
set; the learner consumes it. The samples of one prompt share a ``group_id`` (the rollout id of
the group's first sample); batches sent to different actors may split a group. ``metadata``
carries the dataset row's other fields as JSON (for example a reference answer) so reward
functions can use them. ``score_components`` maps each named reward component to its raw score
when the reward has components (``reward.components``; ``score`` is then their weighted sum),
and is null otherwise.

Multi-turn trajectories (an ``env:`` job, envs/) fill the agentic columns; single-turn rollouts
leave them null. ``response_ids`` then holds every token after the prompt in order: the tokens
the engine sampled and the tokens the environment's observations added between turns.
``loss_mask`` marks each of them: 1 for a token the policy sampled (trained on), 0 for an
observation token (context only; its ``response_logprobs`` entry is 0). ``turn_ends`` is the
index in ``response_ids`` of the last sampled token of each turn, where that turn's
``turn_rewards`` entry (the environment's reward for the turn, if any) is placed.
``env_info`` is the environment's info of the last step as JSON, with rlfleet's counters
(tool calls, tool errors, truncations).

``token_versions`` is the policy version that sampled each response token, when a generator
samples request by request (multi-turn, or ``mode: async``, where new weights can arrive in the
middle of a request); ``policy_version`` is then the oldest of them. Null: every token was
sampled with ``policy_version``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pyarrow as pa

ROLLOUT_SCHEMA = pa.schema(
    [
        pa.field("rollout_id", pa.int64(), nullable=False),
        pa.field("group_id", pa.int64(), nullable=False),
        pa.field("prompt", pa.string(), nullable=False),
        pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("response", pa.string()),
        pa.field("response_ids", pa.list_(pa.int32())),
        pa.field("response_logprobs", pa.list_(pa.float32())),
        pa.field("finish_reason", pa.string()),
        pa.field("policy_version", pa.int64()),
        pa.field("metadata", pa.string()),
        pa.field("score", pa.float32()),
        pa.field("score_components", pa.map_(pa.string(), pa.float32())),
        pa.field("loss_mask", pa.list_(pa.int8())),
        pa.field("num_turns", pa.int32()),
        pa.field("turn_ends", pa.list_(pa.int32())),
        pa.field("turn_rewards", pa.list_(pa.float32())),
        pa.field("env_info", pa.string()),
        pa.field("token_versions", pa.list_(pa.int32())),
    ]
)


def prompt_batch(
    rollout_ids: Sequence[int],
    prompts: Sequence[str],
    prompt_ids: Sequence[Sequence[int]],
    metadata: Sequence[dict[str, Any]] | None = None,
    group_ids: Sequence[int] | None = None,
) -> pa.RecordBatch:
    """A batch of prompts to generate for: the rollout columns are still null. Without
    ``group_ids`` each sample is a group of its own."""
    n = len(rollout_ids)
    groups = rollout_ids if group_ids is None else group_ids
    if not len(prompts) == len(prompt_ids) == len(groups) == n:
        raise ValueError(
            f"rollout_ids, prompts, prompt_ids and group_ids differ in length: "
            f"{n}, {len(prompts)}, {len(prompt_ids)}, {len(groups)}"
        )
    meta = metadata if metadata is not None else [{}] * n
    columns = {
        "rollout_id": list(rollout_ids),
        "group_id": list(groups),
        "prompt": list(prompts),
        "prompt_ids": [list(ids) for ids in prompt_ids],
        "metadata": [json.dumps(m) for m in meta],
    }
    return pa.RecordBatch.from_pydict(
        {name: columns.get(name, [None] * n) for name in ROLLOUT_SCHEMA.names},
        schema=ROLLOUT_SCHEMA,
    )


def with_columns(batch: pa.RecordBatch, **columns: Sequence[Any]) -> pa.RecordBatch:
    """A copy of ``batch`` with the named columns replaced, checked against the schema."""
    unknown = set(columns) - set(ROLLOUT_SCHEMA.names)
    if unknown:
        raise ValueError(f"not rollout columns: {sorted(unknown)}")
    arrays = [
        pa.array(columns[f.name], type=f.type) if f.name in columns else batch.column(f.name)
        for f in ROLLOUT_SCHEMA
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=ROLLOUT_SCHEMA)


def concat_batches(batches: Sequence[pa.RecordBatch]) -> pa.RecordBatch:
    table = pa.Table.from_batches(list(batches), schema=ROLLOUT_SCHEMA)
    return table.combine_chunks().to_batches()[0]
