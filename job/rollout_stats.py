"""The reward statistics of a scored rollout batch: the same math for the training iteration's
stats line (``reward_mean`` ...) and for held-out evaluation's (``eval/reward_mean`` ...)."""

from __future__ import annotations

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


def reward_stats(batch: pa.RecordBatch) -> dict[str, Any]:
    """``reward_mean``, ``reward_std`` (population), each component's mean and
    ``response_length_mean`` (tokens) of a scored batch."""
    scores = np.asarray(batch.column("score").to_pylist(), dtype=np.float64)
    lengths = [len(ids) for ids in batch.column("response_ids").to_pylist()]
    return {
        "reward_mean": float(scores.mean()),
        "reward_std": float(scores.std()),
        **component_means(batch),
        "response_length_mean": float(np.mean(lengths)),
    }
