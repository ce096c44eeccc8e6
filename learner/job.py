"""The PPO job on Ray: generators sample, reward actors score, the learner trains, weights go back.

One iteration (see ARCHITECTURE.md): take ``ppo.batch_size`` prompts from the dataset cursor and
give each a rollout id; split them across the generator actors; split the rollouts across the
reward actors; one PPO step on the learner actor; publish the new weights once and have every
generator confirm the version it holds before it samples again (unless ``max_policy_lag``
allows it to lag). ``one_step_off`` overlaps generating batch k+1 with training on batch k.

An actor that dies mid-batch is restarted (with the current weights, for a generator) and its
unfinished shard is dispatched again; results are kept per shard, so nothing is counted twice.
Each rollout id is consumed exactly once: the learner refuses an id it has already trained on.

``rlfleet train --config job.yaml [--set a.b=c ...] [--resume-from URI|latest]``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from pydantic import ValidationError

from rlfleet.common.config import JobConfig, load_job_config
from rlfleet.common.metrics import JobMetrics, file_sd_path, write_file_sd
from rlfleet.common.schema import concat_batches, prompt_batch

MAX_DISPATCH_ATTEMPTS = 3
"""An unfinished shard is dispatched at most this often before the job gives up."""

DispatchHook = Callable[[str, int, list[Any]], None]
"""``hook(kind, iteration, actors)``: called right after a batch's shards went out (for tests)."""


class ConfigError(ValueError):
    """A job config that validates but cannot run; the message starts with the key."""


# ----------------------------------------------------------------------------------------------
# Dataset


def read_prompt_rows(path: str | os.PathLike[str], prompt_field: str) -> list[dict[str, Any]]:
    """Rows of a JSONL or Parquet file; every row must have a non-empty string ``prompt_field``."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"dataset.path: no such file: {path}")
    if path.suffix == ".parquet":
        rows = pq.read_table(path).to_pylist()
    elif path.suffix in (".jsonl", ".json"):
        rows = [_json_row(path, n, line) for n, line in _numbered_lines(path)]
    else:
        raise ConfigError(f"dataset.path: {path} is neither .jsonl nor .parquet")
    if not rows:
        raise ConfigError(f"dataset.path: {path} has no rows")
    for index, row in enumerate(rows):
        prompt = row.get(prompt_field)
        if not isinstance(prompt, str) or not prompt:
            raise ConfigError(
                f"dataset.prompt_field: row {index} of {path} has no non-empty string "
                f"{prompt_field!r} (got {prompt!r})"
            )
    return rows


def _numbered_lines(path: Path) -> list[tuple[int, str]]:
    lines = path.read_text().splitlines()
    return [(n, line) for n, line in enumerate(lines, start=1) if line.strip()]


def _json_row(path: Path, line_number: int, line: str) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"dataset.path: {path} line {line_number}: {exc}") from exc
    if not isinstance(row, dict):
        raise ConfigError(f"dataset.path: {path} line {line_number} is not a JSON object")
    return row


class PromptDataset:
    """Dataset rows behind a cursor; each epoch is a fresh permutation seeded by (seed, epoch)."""

    def __init__(self, rows: list[dict[str, Any]], shuffle: bool, seed: int) -> None:
        self.rows = rows
        self.shuffle = shuffle
        self.seed = seed
        self.epoch = 0
        self.offset = 0
        self._order = self._epoch_order(0)

    def take(self, n: int) -> list[tuple[int, dict[str, Any]]]:
        """The next ``n`` ``(row index, row)`` pairs, wrapping into the next epoch."""
        taken = []
        while len(taken) < n:
            if self.offset == len(self._order):
                self.epoch, self.offset = self.epoch + 1, 0
                self._order = self._epoch_order(self.epoch)
            index = self._order[self.offset]
            taken.append((index, self.rows[index]))
            self.offset += 1
        return taken

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = state["epoch"], state["offset"]
        self._order = self._epoch_order(self.epoch)

    def _epoch_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.rows)))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order


# ----------------------------------------------------------------------------------------------
# Config checks that need more than pydantic: all of them run before any actor starts.


def check_config(config: JobConfig) -> list[dict[str, Any]]:
    """Checks what pydantic cannot (files, fields, the reward function); returns the rows."""
    model_dir = Path(config.model)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"model: {model_dir} is not a model directory (no config.json)")
    if config.reward.function:
        from rlfleet.reward.functions import load_function

        try:
            load_function(config.reward.function)
        except ValueError as exc:
            raise ConfigError(f"reward.function: {exc}") from exc
    if config.reward.model and not (Path(config.reward.model) / "config.json").is_file():
        raise ConfigError(f"reward.model: {config.reward.model} is not a model directory")
    return read_prompt_rows(config.dataset.path, config.dataset.prompt_field)


def context_length(model_dir: str) -> int:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return int(config.get("n_positions") or config.get("max_position_embeddings") or 1 << 30)


# ----------------------------------------------------------------------------------------------
# Actor pools


@dataclass
class PendingShards:
    """Shards in flight on a pool: object ref -> (shard index, shard)."""

    method: str
    refs: dict[Any, tuple[int, pa.RecordBatch]] = field(default_factory=dict)
    attempts: dict[int, int] = field(default_factory=dict)


class ActorPool:
    """A fixed number of restartable actors of one role; shard i of a batch goes to actor i."""

    def __init__(
        self,
        kind: str,
        create: Callable[[int], Any],
        size: int,
        on_restart: Callable[[int, Any], None] | None = None,
    ) -> None:
        self.kind = kind
        self.create = create
        self.on_restart = on_restart
        self.actors = [create(index) for index in range(size)]
        self.restarts = 0

    def wait_ready(self) -> None:
        ray.get([actor.ready.remote() for actor in self.actors])

    def restart(self, index: int) -> None:
        """Replaces actor ``index`` (killing what is left of it) and waits until it is ready."""
        ray.kill(self.actors[index], no_restart=True)
        actor = self.create(index)
        ray.get(actor.ready.remote())
        self.actors[index] = actor
        self.restarts += 1
        if self.on_restart:
            self.on_restart(index, actor)

    def dispatch(self, method: str, shards: Sequence[pa.RecordBatch]) -> PendingShards:
        pending = PendingShards(method)
        for index, shard in enumerate(shards):
            self._send(pending, index, shard)
        return pending

    def collect(self, pending: PendingShards) -> list[pa.RecordBatch]:
        """Every shard's result in shard order; a dead actor's shard is sent again."""
        results: dict[int, pa.RecordBatch] = {}
        while pending.refs:
            [ref], _ = ray.wait(list(pending.refs), num_returns=1)
            index, shard = pending.refs.pop(ref)
            try:
                results[index] = ray.get(ref)
            except ray.exceptions.RayActorError as exc:
                if pending.attempts[index] >= MAX_DISPATCH_ATTEMPTS:
                    raise RuntimeError(
                        f"{self.kind} actor {index} died {MAX_DISPATCH_ATTEMPTS} times on rollouts "
                        f"{_id_range(shard)}"
                    ) from exc
                self.restart(index)
                self._send(pending, index, shard)
        return [results[index] for index in sorted(results)]

    def call_all(self, method: str, *args: Any) -> list[Any]:
        """``method(*args)`` on every actor; a dead actor is restarted (its ``on_restart`` then
        does what the call was for) and counted as done."""
        refs = [getattr(actor, method).remote(*args) for actor in self.actors]
        results = []
        for index, ref in enumerate(refs):
            try:
                results.append(ray.get(ref))
            except ray.exceptions.RayActorError:
                self.restart(index)
                results.append(None)
        return results

    def _send(self, pending: PendingShards, index: int, shard: pa.RecordBatch) -> None:
        pending.attempts[index] = pending.attempts.get(index, 0) + 1
        ref = getattr(self.actors[index], pending.method).remote(shard)
        pending.refs[ref] = (index, shard)


def split_batch(batch: pa.RecordBatch, parts: int) -> list[pa.RecordBatch]:
    """Contiguous shards of near-equal size (no empty ones)."""
    parts = max(1, min(parts, batch.num_rows))
    bounds = np.linspace(0, batch.num_rows, parts + 1).round().astype(int)
    return [batch.slice(lo, hi - lo) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]


def _id_range(batch: pa.RecordBatch) -> str:
    ids = batch.column("rollout_id").to_pylist()
    return f"{min(ids)}..{max(ids)}" if ids else "(none)"


# ----------------------------------------------------------------------------------------------
# The job


@dataclass
class JobResult:
    stats: list[dict[str, Any]]
    consumed_rollout_ids: list[int]
    generator_restarts: int
    reward_restarts: int


class PPOJob:
    """One job's actors and loop state. ``run()`` does the iterations and returns the result."""

    def __init__(
        self,
        config: JobConfig,
        rows: list[dict[str, Any]] | None = None,
        on_dispatch: DispatchHook | None = None,
    ) -> None:
        from transformers import AutoTokenizer

        self.config = config
        self.on_dispatch = on_dispatch
        self.dataset = PromptDataset(
            rows if rows is not None else check_config(config), config.dataset.shuffle, config.seed
        )
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.max_prompt_tokens = context_length(config.model) - config.generators.max_new_tokens
        self.iteration = 0
        self.next_rollout_id = 0
        self.weights_ref: Any = None
        self.weights_version = 0
        self.in_flight_from: dict[str, Any] | None = None
        """Where the batch still in flight was taken from: a checkpoint resumes there."""
        self.output_dir = Path(config.output_dir)
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self.metrics = JobMetrics.from_config(config.name, 0, config.metrics)
        self.learner, self.generators, self.rewards = self._start_actors()
        self.publish_metrics_targets()

    # -- actors --------------------------------------------------------------------------------

    def _start_actors(self) -> tuple[Any, ActorPool, ActorPool]:
        from rlfleet.actors.generator import RemoteGenerator, generator_options
        from rlfleet.learner.actor import LearnerActor
        from rlfleet.reward.actor import RewardActor

        cfg = self.config
        learner = (
            ray.remote(LearnerActor)
            .options(num_cpus=cfg.learner.num_cpus, num_gpus=cfg.learner.num_gpus)
            .remote(
                cfg.model, self._ppo_config(), cfg.seed, cfg.max_policy_lag, cfg.name, cfg.metrics
            )
        )
        generator_cls = RemoteGenerator.options(**generator_options(cfg.generators))
        reward_cls = ray.remote(RewardActor).options(
            num_cpus=cfg.reward.num_cpus, num_gpus=cfg.reward.num_gpus
        )
        generators = ActorPool(
            "generator",
            lambda i: generator_cls.remote(
                i, cfg.model, cfg.generators, cfg.seed, cfg.name, cfg.metrics
            ),
            cfg.generators.num_actors,
            on_restart=self._on_generator_restart,
        )
        rewards = ActorPool(
            "reward",
            lambda i: reward_cls.remote(i, cfg.reward, cfg.name, cfg.metrics),
            cfg.reward.num_actors,
            on_restart=self._on_reward_restart,
        )
        ray.get(learner.ready.remote())
        generators.wait_ready()
        rewards.wait_ready()
        self.metrics.set_actors_alive("learner", 1)
        self.metrics.set_actors_alive("generator", len(generators.actors))
        self.metrics.set_actors_alive("reward", len(rewards.actors))
        return learner, generators, rewards

    def publish_metrics_targets(self) -> None:
        """Writes the metrics endpoints of the driver and of every actor to the job's Prometheus
        file_sd file (see common/metrics.py); again after a restart. Nothing when disabled."""
        if not self.config.metrics.enabled:
            return
        actors = [self.learner, *self.generators.actors, *self.rewards.actors]
        targets = ray.get([actor.metrics_target.remote() for actor in actors])
        write_file_sd(self.file_sd_path, [self.metrics.target, *targets])

    @property
    def file_sd_path(self) -> Path:
        return file_sd_path(self.config.name, self.config.metrics.file_sd_dir)

    def _ppo_config(self):
        """The PPO config, seeded by the job's seed unless ``ppo.seed`` was given."""
        ppo = self.config.ppo
        if "seed" in ppo.model_fields_set:
            return ppo
        return ppo.model_copy(update={"seed": self.config.seed})

    def _on_generator_restart(self, index: int, actor: Any) -> None:
        """A restarted generator starts from the model directory: give it the current policy."""
        self.metrics.record_actor_restart("generator")
        self.publish_metrics_targets()
        if self.weights_ref is None:
            return
        version = ray.get(actor.load_weights.remote(self.weights_ref))
        self._check_version(index, version)

    def _on_reward_restart(self, index: int, actor: Any) -> None:
        self.metrics.record_actor_restart("reward")
        self.publish_metrics_targets()

    def _check_version(self, index: int, version: int) -> None:
        if version != self.weights_version:
            raise RuntimeError(
                f"generator {index} holds policy version {version}, expected {self.weights_version}"
            )

    # -- one iteration's parts -----------------------------------------------------------------

    def next_prompt_batch(self) -> pa.RecordBatch:
        """``ppo.batch_size`` prompts with fresh rollout ids, tokenized."""
        field_name = self.config.dataset.prompt_field
        taken = self.dataset.take(self.config.ppo.batch_size)
        ids = list(range(self.next_rollout_id, self.next_rollout_id + len(taken)))
        self.next_rollout_id += len(taken)
        prompts = [row[field_name] for _, row in taken]
        prompt_ids = [self._tokenize(index, row[field_name]) for index, row in taken]
        metadata = [{k: v for k, v in row.items() if k != field_name} for _, row in taken]
        return prompt_batch(ids, prompts, prompt_ids, metadata)

    def _tokenize(self, row_index: int, prompt: str) -> list[int]:
        ids = self.tokenizer.encode(prompt)
        if not ids or len(ids) > self.max_prompt_tokens:
            raise ValueError(
                f"dataset row {row_index}: prompt is {len(ids)} tokens; it must be 1.."
                f"{self.max_prompt_tokens} (context length minus generators.max_new_tokens)"
            )
        return ids

    def dispatch_generation(self, batch: pa.RecordBatch) -> PendingShards:
        pending = self.generators.dispatch(
            "generate", split_batch(batch, len(self.generators.actors))
        )
        if self.on_dispatch:
            self.on_dispatch("generator", self.iteration, self.generators.actors)
        return pending

    def collect_rollouts(self, pending: PendingShards, expected_ids: list[int]) -> pa.RecordBatch:
        rollouts = concat_batches(self.generators.collect(pending))
        got = rollouts.column("rollout_id").to_pylist()
        if sorted(got) != sorted(expected_ids) or len(set(got)) != len(got):
            raise RuntimeError(
                f"generators returned rollout ids {_id_range(rollouts)} ({len(got)} rows), "
                f"expected {len(expected_ids)} distinct ids"
            )
        return rollouts

    def score(self, rollouts: pa.RecordBatch) -> pa.RecordBatch:
        pending = self.rewards.dispatch("score", split_batch(rollouts, len(self.rewards.actors)))
        if self.on_dispatch:
            self.on_dispatch("reward", self.iteration, self.rewards.actors)
        return concat_batches(self.rewards.collect(pending))

    def sync_weights(self) -> None:
        """Publishes the learner's policy once and waits until every generator holds it."""
        self.weights_version, [self.weights_ref] = ray.get(self.learner.publish_weights.remote())
        versions = self.generators.call_all("load_weights", self.weights_ref)
        for index, version in enumerate(versions):
            if version is not None:
                self._check_version(index, version)

    def needs_sync(self) -> bool:
        """Whether the generators' next rollouts would lag more than ``max_policy_lag`` versions
        behind the learner that trains on them (one more in one-step-off mode, where they are
        trained on after the next step)."""
        trained_at = self.iteration + int(self.config.one_step_off)
        return trained_at - self.weights_version > self.config.max_policy_lag

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> JobResult:
        """Runs the remaining iterations, appending one line per iteration to stats.jsonl."""
        from tqdm import tqdm

        stats_path = self.output_dir / "stats.jsonl"
        if self.iteration == 0:
            stats_path.write_text("")
        if self.needs_sync():
            self.sync_weights()
        all_stats = []
        bar = tqdm(total=self.config.iterations, initial=self.iteration, desc="ppo", unit="it")
        with stats_path.open("a") as out:
            if self.iteration < self.config.iterations:
                batch, pending, dispatch_s = self.start_generation()
            while self.iteration < self.config.iterations:
                stats, batch, pending, dispatch_s = self.run_iteration(batch, pending, dispatch_s)
                out.write(json.dumps(stats) + "\n")
                out.flush()
                all_stats.append(stats)
                bar.update(1)
                bar.set_postfix(
                    reward=f"{stats['reward_mean']:.3f}", kl=f"{stats['objective/kl']:.3f}"
                )
        bar.close()
        ray.get(self.learner.wait_for_checkpoint.remote())
        return JobResult(
            stats=all_stats,
            consumed_rollout_ids=ray.get(self.learner.consumed_rollout_ids.remote()),
            generator_restarts=self.generators.restarts,
            reward_restarts=self.rewards.restarts,
        )

    def run_iteration(
        self, batch: pa.RecordBatch, pending: PendingShards, dispatch_s: float
    ) -> tuple[dict[str, Any], pa.RecordBatch | None, PendingShards | None, float]:
        """Trains on ``batch`` (already dispatched to the generators); returns the stats line and
        the next batch in flight (or None after the last iteration)."""
        last = self.iteration + 1 == self.config.iterations
        started = time.perf_counter()
        rollouts = self.collect_rollouts(pending, batch.column("rollout_id").to_pylist())
        generate_s = dispatch_s + time.perf_counter() - started
        self.in_flight_from = None
        next_batch, next_pending, next_dispatch_s = None, None, 0.0
        if self.config.one_step_off and not last:
            next_batch, next_pending, next_dispatch_s = self.start_generation()

        started = time.perf_counter()
        scored = self.score(rollouts)
        score_s = time.perf_counter() - started

        started = time.perf_counter()
        learner_stats = ray.get(self.learner.step.remote(scored))
        train_s = time.perf_counter() - started
        self.iteration += 1

        started = time.perf_counter()
        if self.needs_sync():
            self.sync_weights()
        sync_s = time.perf_counter() - started
        self.save_checkpoint_if_due()

        if not self.config.one_step_off and not last:
            next_batch, next_pending, next_dispatch_s = self.start_generation()
        seconds = {"generate": generate_s, "score": score_s, "train": train_s, "sync": sync_s}
        tokens = sum(len(ids) for ids in scored.column("response_ids").to_pylist())
        self.metrics.record_iteration(scored.num_rows, tokens, seconds)
        self.metrics.set_inflight_rollouts(next_batch.num_rows if next_batch is not None else 0)
        stats = self.stats_line(scored, learner_stats)
        stats.update({f"time/{stage}_s": value for stage, value in seconds.items()})
        return stats, next_batch, next_pending, next_dispatch_s

    def start_generation(self) -> tuple[pa.RecordBatch, PendingShards, float]:
        started = time.perf_counter()
        self.in_flight_from = self.cursor_state()
        batch = self.next_prompt_batch()
        pending = self.dispatch_generation(batch)
        return batch, pending, time.perf_counter() - started

    def stats_line(self, scored: pa.RecordBatch, learner_stats: dict[str, float]) -> dict[str, Any]:
        scores = np.asarray(scored.column("score").to_pylist(), dtype=np.float64)
        lengths = [len(ids) for ids in scored.column("response_ids").to_pylist()]
        versions = scored.column("policy_version").to_pylist()
        ids = scored.column("rollout_id").to_pylist()
        return {
            "iteration": self.iteration,
            "policy_version": self.iteration,
            "samples": scored.num_rows,
            "rollout_ids": [min(ids), max(ids)],
            "sampled_with_versions": sorted(set(versions)),
            "reward_mean": float(scores.mean()),
            "reward_std": float(scores.std()),
            "response_length_mean": float(np.mean(lengths)),
            "generator_restarts": self.generators.restarts,
            "reward_restarts": self.rewards.restarts,
            **{k: v for k, v in learner_stats.items() if k.startswith(("objective/", "ppo/"))},
        }

    # -- checkpoints ---------------------------------------------------------------------------

    def cursor_state(self) -> dict[str, Any]:
        return {"dataset": self.dataset.state(), "next_rollout_id": self.next_rollout_id}

    def save_checkpoint_if_due(self) -> None:
        """Every ``checkpoint.every`` iterations and after the last one, when ``checkpoint.uri``
        is set. The job state points at the first batch not trained on yet, so a resumed job
        samples it again (with the restored policy) and skips nothing."""
        cfg = self.config.checkpoint
        every = cfg.every or self.config.iterations
        due = self.iteration % every == 0 or self.iteration == self.config.iterations
        if cfg.uri is None or not due:
            return
        state = {"iteration": self.iteration, **(self.in_flight_from or self.cursor_state())}
        started = time.perf_counter()
        ray.get(self.learner.save_checkpoint.remote(cfg, state))
        self.metrics.record_checkpoint(time.perf_counter() - started)

    def resume(self, uri: str) -> None:
        """Restores learner, cursor and rollout ids from a checkpoint; stats.jsonl keeps the
        lines up to its iteration. Generators get the restored weights before they sample."""
        state = ray.get(self.learner.load_checkpoint.remote(uri, self.config.checkpoint))
        self.iteration = state["iteration"]
        self.dataset.load_state(state["dataset"])
        self.next_rollout_id = state["next_rollout_id"]
        stats_path = self.output_dir / "stats.jsonl"
        if stats_path.exists():
            kept = [
                line
                for line in stats_path.read_text().splitlines()
                if json.loads(line)["iteration"] <= self.iteration
            ]
            stats_path.write_text("".join(f"{line}\n" for line in kept))

    def shutdown(self) -> None:
        """Stops every actor; Prometheus is first told to forget the job's endpoints."""
        if self.config.metrics.enabled:
            self.file_sd_path.unlink(missing_ok=True)
        for actor in [self.learner, *self.generators.actors, *self.rewards.actors]:
            ray.kill(actor, no_restart=True)
        self.metrics.close()


def run_job(
    config: JobConfig,
    resume_from: str | None = None,
    on_dispatch: DispatchHook | None = None,
    rows: list[dict[str, Any]] | None = None,
) -> JobResult:
    """Starts the actors on the connected Ray cluster and runs the job; ``resume_from`` is a
    checkpoint URI, or ``"latest"`` under ``checkpoint.uri``. ``rows`` are the prompt rows
    ``check_config`` returned; without them the config is checked here."""
    resume_uri = resolve_resume(config, resume_from)
    job = PPOJob(config, rows, on_dispatch=on_dispatch)
    try:
        if resume_uri:
            job.resume(resume_uri)
        return job.run()
    finally:
        job.shutdown()


def resolve_resume(config: JobConfig, resume_from: str | None) -> str | None:
    if resume_from != "latest":
        return resume_from
    if config.checkpoint.uri is None:
        raise ConfigError("checkpoint.uri: --resume-from latest needs a checkpoint URI")
    return config.checkpoint.uri


# ----------------------------------------------------------------------------------------------
# Ray and the command line


def required_cpus(config: JobConfig) -> float:
    return (
        config.learner.num_cpus
        + config.generators.num_actors * config.generators.num_cpus
        + config.reward.num_actors * config.reward.num_cpus
    )


def init_ray(config: JobConfig) -> None:
    """Joins ``ray_address`` or the cluster of a submitted job (RAY_ADDRESS is set there); else
    starts a local in-process instance with enough logical CPUs for every actor. Never
    auto-detects another cluster on this machine."""
    if ray.is_initialized():
        return
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if config.ray_address:
        ray.init(address=config.ray_address)
    elif os.environ.get("RAY_ADDRESS"):
        ray.init(address="auto")
    else:
        num_cpus = max(os.cpu_count() or 1, math.ceil(required_cpus(config)))
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="job config (YAML)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. generators.num_actors=4 (repeatable)",
    )
    parser.add_argument(
        "--resume-from",
        metavar="URI|latest",
        help="resume from a checkpoint URI, or the latest one under checkpoint.uri",
    )


def run(args: argparse.Namespace) -> int:
    try:
        config = load_job_config(args.config, args.overrides)
        rows = check_config(config)
        resolve_resume(config, args.resume_from)
    except (ValidationError, ConfigError, OSError) as exc:
        print(f"rlfleet train: invalid job config {args.config}:\n{exc}", file=sys.stderr)
        return 2
    init_ray(config)
    result = run_job(config, args.resume_from, rows=rows)
    last = result.stats[-1]
    print(
        f"done: {len(result.stats)} iterations, {len(result.consumed_rollout_ids)} rollouts, "
        f"reward {result.stats[0]['reward_mean']:.3f} -> {last['reward_mean']:.3f}, "
        f"stats in {Path(config.output_dir) / 'stats.jsonl'}"
    )
    return 0
