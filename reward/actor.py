"""The reward actor: scores rollout batches with the job's one reward source.

Use it as a Ray actor, its resources taken from the job config (``job``, a ``JobConfig``)::

    actor = ray.remote(RewardActor).options(
        num_cpus=job.reward.num_cpus, num_gpus=job.reward.num_gpus
    ).remote(index, job.reward, job.name, job.metrics)
"""

from __future__ import annotations

import json
import time
from typing import Any

import pyarrow as pa

from rlfleet.common.config import MetricsConfig, RewardConfig
from rlfleet.common.metrics import MetricsTarget
from rlfleet.common.schema import with_columns
from rlfleet.reward.metrics import RewardMetrics
from rlfleet.reward.scorers import RewardError, make_scorer

_TEXT_PREVIEW_CHARS = 80
_IDS_NAMED = 8


def _preview(text: str | None) -> str:
    if text is None:
        return "None"
    if len(text) <= _TEXT_PREVIEW_CHARS:
        return repr(text)
    return repr(text[:_TEXT_PREVIEW_CHARS]) + f"... ({len(text)} chars)"


def _name_ids(rollout_ids: list[int]) -> str:
    named = ", ".join(str(i) for i in rollout_ids[:_IDS_NAMED])
    more = len(rollout_ids) - _IDS_NAMED
    return named + (f" and {more} more" if more > 0 else "")


def _decode_metadata(raw: list[str | None]) -> list[dict[str, Any]]:
    """The ``metadata`` column's JSON objects (``{}`` for null), or an error naming the sample."""
    rows = []
    for index, text in enumerate(raw):
        try:
            row = json.loads(text) if text is not None else {}
        except ValueError as exc:
            raise RewardError(f"metadata is not JSON: {exc}", [index]) from exc
        if not isinstance(row, dict):
            raise RewardError(f"metadata is a JSON {type(row).__name__}, not an object", [index])
        rows.append(row)
    return rows


class RewardActor:
    """Fills the ``score`` column of rollout batches (``rlfleet.common.schema.ROLLOUT_SCHEMA``),
    and ``score_components`` when the reward has named components."""

    def __init__(
        self,
        index: int,
        config: RewardConfig,
        job_name: str = "rlfleet",
        metrics: MetricsConfig | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        """Load the reward source; serve this actor's Prometheus metrics as ``job_name``
        unless ``metrics.enabled`` is off. A reward model's own code runs only with
        ``trust_remote_code``."""
        self.index = index
        self.scorer = make_scorer(config, trust_remote_code)
        self._metrics = RewardMetrics.from_config(job_name, index, metrics or MetricsConfig())

    def ready(self) -> bool:
        """True once the scorer (and any reward model) is loaded."""
        return True

    def metrics_target(self) -> MetricsTarget | None:
        """Where this actor serves its Prometheus metrics (None when metrics are disabled)."""
        return self._metrics.served_target

    def score(self, batch: pa.RecordBatch) -> pa.RecordBatch:
        """The batch with its scores set; a failure is a ``RewardError`` naming the rollouts."""
        rollout_ids = batch.column("rollout_id").to_pylist()
        prompts = batch.column("prompt").to_pylist()
        responses = batch.column("response").to_pylist()
        started = time.perf_counter()
        try:
            missing = [index for index, response in enumerate(responses) if response is None]
            if missing:
                raise RewardError("no response to score", missing)
            metadata = _decode_metadata(batch.column("metadata").to_pylist())
            scores, parts = self.scorer.score_parts(prompts, responses, metadata)
        except Exception as exc:
            self._count_failure(exc)
            raise self._describe_failure(exc, rollout_ids, prompts, responses) from exc
        self._metrics.record_scores(scores, time.perf_counter() - started)
        if not parts:
            return with_columns(batch, score=scores)
        self._metrics.record_component_scores(parts)
        rows = [dict(zip(parts, row, strict=True)) for row in zip(*parts.values(), strict=True)]
        return with_columns(batch, score=scores, score_components=rows)

    def _count_failure(self, exc: Exception) -> None:
        if isinstance(exc, TimeoutError):
            self._metrics.record_timeout()
        else:
            self._metrics.record_error()

    def _describe_failure(
        self,
        exc: Exception,
        rollout_ids: list[int],
        prompts: list[str],
        responses: list[str | None],
    ) -> RewardError:
        """``exc`` restated with the rollout ids it concerns and the first one's text.

        A ``RewardError`` already names the reward source and the samples (``indices``, positions
        in the batch); the new error keeps its type, so timeouts stay ``RewardTimeoutError``.
        Any other exception is put down to the reward source and to the whole batch.
        """
        if isinstance(exc, RewardError):
            error_type, cause, indices = type(exc), str(exc), list(exc.indices)
        else:
            error_type = RewardError
            cause = f"{self.scorer.source} raised {type(exc).__name__}: {exc}"
            indices = []
        indices = indices or list(range(len(rollout_ids)))
        first = indices[0]
        message = (
            f"reward actor {self.index} failed on rollout{'s' if len(indices) > 1 else ''} "
            f"{_name_ids([rollout_ids[i] for i in indices])}: {cause} "
            f"[rollout {rollout_ids[first]}: prompt {_preview(prompts[first])}, "
            f"response {_preview(responses[first])}]"
        )
        return error_type(message, indices)
