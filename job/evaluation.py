"""Held-out evaluation (``eval``): the generators answer the eval prompts with the policy they
hold, a reward pool scores the answers, and ``eval/*`` stats go into stats.jsonl (with the
trackers) and Prometheus.

When: before the first iteration (``eval.at_start``), after every ``eval.every``-th iteration
and after the last one (``eval_due``). An iteration's eval runs after that iteration's weight
sync, so it evaluates the policy the generators then hold: the learner's newest, or with
``max_policy_lag`` > 0 an older one when no sync was due; ``eval/policy_version`` records which.

Where the stats go: an iteration's ``eval/*`` join its own stats.jsonl line. The initial policy's
eval is a line of its own, ``{"iteration": 0, "policy_version": 0, "eval/...": ...}``, before
the training lines 1..N, so every line's eval is at the iteration whose policy it measured; a
resume (``keep_through(k)``) keeps that line with the lines up to k, and a job resumed at
k > 0 does not evaluate at start again.

The eval batch is built once, at start-up, before any actor starts: the first
``eval.max_samples`` rows of ``eval.dataset`` (file order), read, rendered and checked by
data.py's functions (a prompt too long for ``eval.max_new_tokens`` is a ``ConfigError`` naming
the file and row), ``eval.n`` samples each, in the rollout schema. Training is left exactly as it
would be without eval: eval rollouts have negative ids (-1, -2, ...) that no training rollout
has and never reach the learner, and the prompt cursor and training's next rollout id are not
touched. A generator samples a rollout with the seed of ``(seed, rollout id)``
(``actors.generator.rollout_seed``), so eval's seeds are a stream of their own; each eval
sample keeps its id, and so its seed, at every eval (with ``eval.temperature`` > 0, differences
between evals come from the policy, not from new draws). The batch carries eval's temperature and
token budget (``actors.engine.SamplingOverride``); top-p and top-k are the generators'.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa

from rlfleet.actors.engine import SamplingOverride
from rlfleet.common.config import EvalConfig, JobConfig
from rlfleet.common.schema import concat_batches, with_columns
from rlfleet.job.checks import ConfigError, check_reward_arguments
from rlfleet.job.data import (
    PromptBatches,
    PromptDataset,
    PromptRenderer,
    check_prompt_lengths,
    max_prompt_tokens,
    read_prompt_rows,
)
from rlfleet.job.pool import ActorPool, split_batch
from rlfleet.job.rollout_stats import reward_stats

EVAL_PREFIX = "eval/"


def eval_due(config: EvalConfig, iteration: int, iterations: int) -> bool:
    """Iteration 0 (the initial policy) with ``at_start``; then every ``every``-th iteration
    and the last."""
    if iteration == 0:
        return config.at_start
    return iteration % config.every == 0 or iteration == iterations


def eval_section(config: JobConfig) -> EvalConfig:
    """The job's ``eval`` section (a job without one is a caller's mistake)."""
    if config.eval is None:
        raise ValueError(f"job {config.name!r} has no eval section")
    return config.eval


def eval_max_new_tokens(config: JobConfig) -> int:
    """Eval's token budget: ``eval.max_new_tokens``, else the generators'."""
    return eval_section(config).max_new_tokens or config.generators.max_new_tokens


def eval_job_config(config: JobConfig) -> JobConfig:
    """The job as its evaluation sees it: eval's dataset, token budget and reward in place of
    training's, so that data.py's reading, rendering and checks apply as they are."""
    evaluation = eval_section(config)
    generators = config.generators.model_copy(
        update={"max_new_tokens": eval_max_new_tokens(config)}
    )
    return config.model_copy(
        update={
            "dataset": evaluation.dataset,
            "generators": generators,
            "reward": evaluation.reward or config.reward,
        }
    )


def eval_rollout_id(index: int) -> int:
    """The id of an eval batch's ``index``-th sample (or of a group: its first sample's):
    negative, so that it is never a training rollout's."""
    return -1 - index


def read_eval_rows(config: JobConfig) -> tuple[list[dict[str, Any]], PromptRenderer]:
    """The rows evaluated (the first ``eval.max_samples``) and their renderer, checked as the
    training dataset is (the fields against the eval reward's arguments, each prompt's length
    against eval's token budget); a ``ConfigError`` names the ``eval.`` key, file and row."""
    job = eval_job_config(config)
    dataset = job.dataset
    try:
        rows = read_prompt_rows(dataset.path, dataset.prompt_field, dataset.messages_field)
        rows = rows[: eval_section(config).max_samples]
        renderer = PromptRenderer.from_config(job)
        check_reward_arguments(job, {name for row in rows for name in renderer.metadata(row)})
        check_prompt_lengths(job, rows, renderer)
    except ConfigError as exc:
        raise ConfigError(f"eval.{exc}") from exc
    return rows, renderer


def eval_batch(config: JobConfig) -> pa.RecordBatch:
    """The eval prompts, ``eval.n`` samples each, as one prompt batch with eval's ids (see
    ``eval_rollout_id``) and sampling settings."""
    evaluation = eval_section(config)
    rows, renderer = read_eval_rows(config)
    prompts = PromptBatches(
        PromptDataset(rows, shuffle=False, seed=config.seed),
        renderer,
        max_prompt_tokens(eval_job_config(config)),
    )
    batch = prompts.next_batch(len(rows), evaluation.n)
    batch = with_columns(
        batch,
        rollout_id=[eval_rollout_id(i) for i in batch.column("rollout_id").to_pylist()],
        group_id=[eval_rollout_id(i) for i in batch.column("group_id").to_pylist()],
    )
    override = SamplingOverride(evaluation.temperature, eval_max_new_tokens(config))
    return override.attach(batch)


def eval_stats(scored: pa.RecordBatch) -> dict[str, Any]:
    """``eval/reward_mean``, ``eval/reward_std``, each reward component's
    ``eval/reward/<name>_mean``, ``eval/response_length_mean``, ``eval/samples`` and the
    policy version the answers were sampled with (``eval/policy_version``: the oldest, should
    generators differ); with several samples per prompt also ``eval/reward_max_mean``, the mean
    over prompts of their best sample's reward."""
    stats = {
        **reward_stats(scored),
        "samples": scored.num_rows,
        "policy_version": min(scored.column("policy_version").to_pylist()),
    }
    best = best_of_groups(scored)
    if len(best) < scored.num_rows:
        stats["reward_max_mean"] = float(np.mean(best))
    return {f"{EVAL_PREFIX}{key}": value for key, value in stats.items()}


def best_of_groups(scored: pa.RecordBatch) -> list[float]:
    """The highest score of each group (prompt) of ``scored``."""
    best: dict[int, float] = defaultdict(lambda: -np.inf)
    groups = scored.column("group_id").to_pylist()
    for group, score in zip(groups, scored.column("score").to_pylist(), strict=True):
        best[group] = max(best[group], score)
    return list(best.values())


def through_pool(pool: ActorPool, method: str, batch: pa.RecordBatch) -> pa.RecordBatch:
    """``method`` of ``pool``'s actors on ``batch``, shard i on actor i (see ``ActorPool``)."""
    shards = split_batch(batch, len(pool.actors))
    return concat_batches(pool.collect(pool.dispatch(method, shards)))


class Evaluation:
    """A job's held-out evaluation: its batch, built once, and when it is due."""

    def __init__(self, config: EvalConfig, batch: pa.RecordBatch, iterations: int) -> None:
        self.config = config
        self.batch = batch
        self.iterations = iterations

    @classmethod
    def from_config(cls, config: JobConfig) -> Evaluation | None:
        """The job's evaluation (None without ``eval``), its prompts read and checked now."""
        if config.eval is None:
            return None
        return cls(config.eval, eval_batch(config), config.iterations)

    def due(self, iteration: int) -> bool:
        return eval_due(self.config, iteration, self.iterations)

    def run(self, generators: ActorPool, rewards: ActorPool) -> dict[str, Any]:
        """Samples the eval batch on ``generators`` with the weights they hold, scores it on
        ``rewards``; its ``eval/*`` stats and ``eval/time_s``."""
        started = time.perf_counter()
        scored = through_pool(rewards, "score", through_pool(generators, "generate", self.batch))
        return {**eval_stats(scored), f"{EVAL_PREFIX}time_s": time.perf_counter() - started}


def eval_postfix(lines: list[dict[str, Any]]) -> dict[str, str]:
    """The progress bar's latest eval reward (nothing before the first eval)."""
    key = f"{EVAL_PREFIX}reward_mean"
    latest = next((line[key] for line in reversed(lines) if key in line), None)
    return {} if latest is None else {"eval": f"{latest:.3f}"}
