"""DAPO's sampling control in a job config: dynamic sampling (``dynamic_sampling:``) and the
soft overlong punishment (``overlong_penalty:``), as veRL 0.9.1 runs them
(algorithms/sampling.py)."""

from __future__ import annotations

from pydantic import BaseModel, PositiveFloat, PositiveInt

from rlfleet.common.trainer_configs import STRICT_MODEL_CONFIG


class DynamicSamplingConfig(BaseModel):
    """Groups whose samples all scored alike teach a grouped algorithm nothing (every advantage
    is 0): they are dropped and more prompts are sampled until the batch is full. Dropped and
    surplus rollout ids are recorded (stats.jsonl ``dynamic_sampling/dropped_rollout_ids``),
    never trained and never sampled again."""

    model_config = STRICT_MODEL_CONFIG

    metric: str = "score"
    """What must differ within a group: ``score``, or a reward component's name."""
    max_rounds: PositiveInt = 10
    """Generation rounds per iteration, the first included (veRL's ``max_num_gen_batches``); a
    batch still short after them stops the job with one line."""


class OverlongPenaltyConfig(BaseModel):
    """DAPO's soft overlong punishment, added to each sample's score: 0 up to the response
    budget less ``buffer_len`` tokens, then falling linearly to ``-penalty_factor`` at the
    budget (``generators.max_new_tokens``, or ``env.max_total_tokens``)."""

    model_config = STRICT_MODEL_CONFIG

    buffer_len: PositiveInt
    penalty_factor: PositiveFloat = 1.0
