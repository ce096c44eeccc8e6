"""The job's loop: generators sample, reward actors score, the learner trains, weights go back.

One iteration (``TrainingJob.train_iteration``, top to bottom): collect the rollouts of the
oldest batch in flight; keep ``batches_ahead`` batches out with the generators (one in
one-step-off mode, ``max_policy_lag`` in ``mode: async``: they sample while the learner trains);
score the rollouts (dynamic sampling refills dropped groups); one training step on the learner's
ranks, the generators asleep meanwhile when they share its GPUs; publish the new weights when
the generators would lag more than allowed (in async mode always: they load them mid-request);
evaluate when due; report the iteration (stats.jsonl, samples.jsonl, trackers: reporting.py);
save a checkpoint when due (its cursor is the oldest batch not trained yet's); in the
synchronous loop send the next batch now; record the metrics. The lines go out before the
checkpoint, so a checkpoint never holds an iteration that stats.jsonl lacks.

Start-up: the learner's ranks, the generators and the reward actors are all started at once and
waited for together, each wait bounded by ``learner.timeout_s`` (plus a margin). A learner rank
that dies or is late then, or while a resume loads its checkpoint, restarts the learner as below.

Each rollout id is consumed exactly once: an actor that dies mid-batch has only its shard sent
again (``pool.ActorPool``) and the learner refuses an id it has already trained on. So has an
actor that misses its deadline (stalled: ``roles.generator_deadline``, ``roles.reward_deadline``,
``weight_sync.timeout_s`` for a weight load): it is killed and restarted like a dead one. Every
wait runs in slices (``common.waits``), so SIGTERM and Ctrl-C stop the job within about a second.

A learner rank that dies or stalls (``ActorWaitError`` from a call to the ranks: a stalled rank
stops answering liveness pings, ``learner.liveness_timeout_s``; published weights lost from the
object store mean rank 0 died, ``sync.weights_lost``) restarts the whole learner, at most
``learner.max_restarts`` times: new ranks in the same placement group restore the newest
committed checkpoint of this run (the model directory without one), the loop goes back to that
checkpoint's iteration and prompt cursor (so the same rollout ids are sampled again, each trained
on once by the restored learner), stats.jsonl drops the lines after it, and every generator loads
the restored policy.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pyarrow as pa
import ray

from rlfleet.common.config import JobConfig
from rlfleet.common.schema import concat_batches
from rlfleet.common.start_errors import stop_if_repeated
from rlfleet.common.transport import resolved_weight_sync
from rlfleet.job.data import PromptBatches, checked_rows
from rlfleet.job.evaluation import Evaluation, eval_postfix
from rlfleet.job.metrics import JobMetrics, MetricsTargets
from rlfleet.job.pool import ActorPool, id_range, split_batch
from rlfleet.job.reporting import JobReport
from rlfleet.job.roles import (
    ActorFactories,
    generator_deadline,
    reward_deadline,
    start_timeout_s,
)
from rlfleet.job.rollout_stats import TrajectorySummary, reward_stats
from rlfleet.job.stages import (
    InFlight,
    JobResult,
    StageTimer,
    checkpoint_due,
    fill_with_varied_groups,
    prompt_count,
    reference_kl,
    with_overlong_penalty,
)
from rlfleet.job.sync import WeightSync, needs_sync
from rlfleet.learner.rank_group import ActorWaitError, LearnerGroup, wait_all

logger = logging.getLogger(__name__)

DispatchHook = Callable[[str, int, list[Any]], None]
"""``hook(kind, iteration, actors)``: called right after a batch's shards went out (for tests)."""

LEARNER_STAT_PREFIXES = ("objective/", "ppo/", "critic_free/", "rollout/")
"""The learner's stats that go into each stats.jsonl line as they are (learner/actor.py names
them: PPO's TRL keys, the critic-free trainer's under ``critic_free/``)."""


class LearnerRestartsExhausted(RuntimeError):
    """The learner failed once more than ``learner.max_restarts`` allows."""


class TrainingJob:
    """One training job's actors and loop state, whatever its ``algorithm`` (PPO or a
    critic-free one: the learner's trainer differs, the loop does not); ``train()`` does the
    iterations.

    ``rows`` are the dataset's rows (read and checked here when not given); ``factories``
    start the actors (the real ones from the config when not given)."""

    def __init__(
        self,
        config: JobConfig,
        rows: list[dict[str, Any]] | None = None,
        on_dispatch: DispatchHook | None = None,
        factories: ActorFactories | None = None,
    ) -> None:
        if rows is None:
            rows = checked_rows(config)
        self.config = config
        self.weight_sync = resolved_weight_sync(config)
        """``weight_sync`` with ``transport: auto`` decided, once: the learner, the generators
        and the driver's sync all use this one."""
        self.on_dispatch = on_dispatch
        self.factories = factories or ActorFactories.from_config(config, self.weight_sync)
        self.report = JobReport.open(config)
        self.start_actors()
        self.prompts = PromptBatches.from_config(config, rows)
        self.initial_cursor = self.prompts.state()
        self.iteration = 0
        self.learner_restarts = 0
        self.learner_start_error: str | None = None
        """How the learner's latest start failed in a rank's constructor (None: it did not)."""
        self.checkpoints: list[str] = []
        """This run's newest checkpoints, oldest first: the one it resumed from or its last
        save, and the save after it (which may not be committed yet)."""
        self.metrics = JobMetrics.from_config(config.name, 0, config.metrics)
        try:
            self.wait_until_ready()
        except BaseException:
            self.shutdown()
            raise
        self.metrics.set_actors_alive("learner", len(self.learner.ranks))
        self.metrics.set_actors_alive("generator", len(self.generators.actors))
        self.metrics.set_actors_alive("reward", len(self.rewards.actors))
        self.publish_metrics_targets()

    def start_actors(self) -> None:
        """Starts the generators, the reward actors (and eval's own, with ``eval.reward``) and
        the learner's ranks, none waited for: they load while the driver tokenizes the prompts
        (``wait_until_ready`` waits). The eval prompts are read and checked first
        (``evaluation.Evaluation``): a bad one stops the job before any actor starts."""
        config, factories = self.config, self.factories
        self.evaluation = Evaluation.from_config(config)
        self.metrics_targets = MetricsTargets(config)
        self.envs = self.start_envs()
        self.generators = ActorPool(
            "generator",
            factories.generator,
            config.generators.num_actors,
            on_restart=self._on_generator_restart,
            deadline=generator_deadline(config),
            start_timeout_s=start_timeout_s(config),
        )
        self.rewards = ActorPool(
            "reward",
            factories.reward,
            config.reward.num_actors,
            on_restart=self._on_reward_restart,
            deadline=reward_deadline(config.reward),
            start_timeout_s=start_timeout_s(config),
        )
        self.eval_rewards: ActorPool | None = None
        try:
            self.eval_rewards = self.start_eval_rewards()
            self.learner = self.start_learner()
        except BaseException:
            self._kill_pools()
            raise

    def start_envs(self) -> ActorPool | None:
        """A multi-turn job's environment actors, before the generators (which are given
        them); Ray restarts one that dies (envs/actor.py), so the pool only starts them."""
        if self.config.env is None or self.factories.env is None:
            return None
        return ActorPool(
            "env",
            self.factories.env,
            self.config.env.num_actors,
            start_timeout_s=start_timeout_s(self.config),
        )

    def start_eval_rewards(self) -> ActorPool | None:
        """Eval's own reward actors (``eval.reward``), after the job's in the metrics' actor
        indices; None: eval scores with the job's."""
        eval_reward = self.config.eval.reward if self.config.eval else None
        if eval_reward is None:
            return None
        if self.factories.eval_reward is None:
            raise ValueError("eval.reward is set but the actor factories start no eval reward")
        return ActorPool(
            "eval reward",
            self.factories.eval_reward,
            eval_reward.num_actors,
            on_restart=self._on_reward_restart,
            deadline=reward_deadline(eval_reward, "eval.reward"),
            start_timeout_s=start_timeout_s(self.config),
        )

    def start_learner(self) -> LearnerGroup:
        """The learner's ranks (not waited for) and the weight sync from them."""
        learner = self.factories.learner()
        self.sync = WeightSync.from_config(learner, self.config, self.weight_sync)
        return learner

    def wait_until_ready(self) -> None:
        """Waits for the learner's ranks, the generators and the reward actors together (they
        start at once), at most the learner's deadline each time one fails; names any that is
        late. A learner rank that dies or is late restarts the learner (``replace_learner``); a
        generator or reward actor that dies is started again (``ActorPool.replace``); the
        others are then waited for. One whose constructor fails twice alike stops the job with
        that error (``common.start_errors``)."""
        members = {
            f"{pool.kind} {i}": (pool, i, actor.ready.remote())
            for pool in self._pools()
            for i, actor in enumerate(pool.actors)
        }
        calls = [*self.learner.ready_calls(), *((name, m[2]) for name, m in members.items())]
        while calls:
            try:
                wait_all(calls, self.learner.deadline_s, "at start-up")
                return
            except ActorWaitError as failure:
                died = isinstance(failure.__cause__, ray.exceptions.RayActorError)
                if failure.learner_failed:
                    self.with_learner_restarts(lambda: None, failure)
                elif (
                    died
                    and failure.actors[0] in members
                    and members[failure.actors[0]][0] is not self.envs
                ):
                    pool, index, _ = members.pop(failure.actors[0])
                    pool.replace(index, failure.start_error)
                    self.metrics.record_actor_restart(
                        "generator" if pool is self.generators else "reward"
                    )
                else:
                    raise
                calls = [(name, ref) for name, ref in calls if name in members]

    # -- the loop ------------------------------------------------------------------------------

    def train(self) -> JobResult:
        """Trains the iterations left (all of them, or those after a resumed checkpoint),
        appending one line per iteration to stats.jsonl; restarts a failed learner (see the
        module's docstring)."""
        from tqdm import tqdm

        if self.iteration == 0:
            self.report.start_fresh()
        bar = tqdm(
            total=self.config.iterations,
            initial=self.iteration,
            desc=self.config.algorithm,
            unit="it",
        )
        failure: ActorWaitError | None = None
        with bar:
            if self.iteration == 0:
                self.record_initial_eval(bar)
            while True:
                try:
                    if failure is not None:
                        self.restart_learner(failure)
                        bar.n = self.iteration
                        bar.refresh()
                    self.train_remaining(bar)
                    consumed = self.learner.consumed_rollout_ids()  # a death here restarts too
                    break
                except ActorWaitError as error:
                    failure = error
        return JobResult(
            stats=self.report.stats_lines,
            consumed_rollout_ids=consumed,
            generator_restarts=self.generators.restarts,
            reward_restarts=self.rewards.restarts,
            learner_restarts=self.learner_restarts,
        )

    @property
    def batches_ahead(self) -> int:
        """Batches out with the generators beyond the one being trained: ``max_policy_lag`` in
        asynchronous mode (they sample while the learner trains, with the newest weights as
        they arrive), one in one-step-off mode, none in the synchronous loop."""
        if self.config.mode == "async":
            return self.config.max_policy_lag
        return int(self.config.one_step_off)

    def dispatch_ahead(self, queue: deque[InFlight]) -> None:
        """Keeps ``batches_ahead`` batches out after the one being trained (iteration
        ``self.iteration``), none past the job's last iteration."""
        while (
            len(queue) < self.batches_ahead
            and self.iteration + 1 + len(queue) < self.config.iterations
        ):
            queue.append(self.dispatch_next_batch())

    def train_remaining(self, bar: Any) -> None:
        """The iterations from ``self.iteration`` on, until the last checkpoint is committed."""
        self.sync_weights_if_needed()
        queue: deque[InFlight] = deque()
        if self.iteration < self.config.iterations:
            queue.append(self.dispatch_next_batch())
            if self.config.mode == "async":
                self.dispatch_ahead(queue)
        while queue:
            stats = self.train_iteration(queue)
            bar.update(1)
            bar.set_postfix(
                reward=f"{stats['reward_mean']:.3f}",
                kl=reference_kl(stats),
                **eval_postfix(self.report.stats_lines),
            )
        self.learner.wait_for_checkpoint()

    def record_initial_eval(self, bar: Any) -> None:
        """The initial policy's eval (``eval.at_start``) as stats.jsonl's line of iteration 0
        (see evaluation.py)."""
        stats = self.evaluate()
        if stats:
            self.report.record({"iteration": 0, "policy_version": 0, **stats})
            bar.set_postfix(**eval_postfix(self.report.stats_lines))

    def evaluate(self) -> dict[str, Any]:
        """The ``eval/*`` stats of the policy the generators hold, when an eval is due after
        this iteration (evaluation.py); else none."""
        if self.evaluation is None or not self.evaluation.due(self.iteration):
            return {}
        stats = self.evaluation.run(self.generators, self.eval_rewards or self.rewards)
        self.metrics.record_eval(self.iteration, stats)
        return stats

    def train_iteration(self, queue: deque[InFlight]) -> dict[str, Any]:
        """Trains on the oldest batch in flight, leaving the next ones in ``queue``
        (``batches_ahead``); returns the iteration's stats line."""
        in_flight = queue.popleft()
        more_to_come = self.iteration + 1 < self.config.iterations
        timer = StageTimer()
        timer.add("generate", in_flight.dispatch_s)
        with timer.stage("generate"):
            rollouts = self.collect_rollouts(in_flight)
        self.dispatch_ahead(queue)

        with timer.stage("score"):
            scored = self.score(rollouts)
        sampling_stats: dict[str, Any] = {}
        if self.config.dynamic_sampling is not None:
            scored, sampling_stats = self.fill_with_varied_groups(scored, timer)
        with timer.stage("train"), self.generators_asleep():
            learner_stats = self.learner.step(scored)
        self.iteration += 1
        with timer.stage("sync"):
            self.sync_weights_if_needed()

        stats = {
            **self.stats_line(scored, learner_stats),
            **sampling_stats,
            **timer.stats(),
            **self.evaluate(),
        }
        due = checkpoint_due(self.config.checkpoint, self.iteration, self.config.iterations)
        self.report.record(stats, scored, durable=due)
        if due:
            self.save_checkpoint(queue[0].cursor_before if queue else self.prompts.state())
        if not queue and more_to_come:
            queue.append(self.dispatch_next_batch())

        self.record_metrics(scored, timer.seconds, queue)
        return stats

    # -- one iteration's parts -----------------------------------------------------------------

    def fill_with_varied_groups(
        self, scored: pa.RecordBatch, timer: StageTimer
    ) -> tuple[pa.RecordBatch, dict[str, Any]]:
        """Dynamic sampling (``dynamic_sampling``, stages.py ``fill_with_varied_groups``): more
        prompts are sampled and scored until the batch's groups all differ."""

        def sample_more(prompts: int) -> pa.RecordBatch:
            with timer.stage("generate"):
                rollouts = self.collect_rollouts(self.dispatch_next_batch(prompts))
            with timer.stage("score"):
                return self.score(rollouts)

        spec = self.config.dynamic_sampling
        return fill_with_varied_groups(scored, spec, self.config.prompts_per_iteration, sample_more)

    def dispatch_next_batch(self, prompts: int | None = None) -> InFlight:
        """Takes the next ``prompts`` prompts (``prompts_per_iteration``: the trainer's batch
        size in samples), ``n_samples_per_prompt`` samples each, and sends one shard to each
        generator: a shard may split a group, the learner regroups by group id."""
        started = time.perf_counter()
        cursor_before = self.prompts.state()
        batch = self.prompts.next_batch(
            prompts or self.config.prompts_per_iteration,
            self.config.generators.n_samples_per_prompt,
        )
        shards = split_batch(batch, len(self.generators.actors))
        pending = self.generators.dispatch("generate", shards)
        self._dispatched(self.generators)
        return InFlight(batch, pending, cursor_before, time.perf_counter() - started)

    def collect_rollouts(self, in_flight: InFlight) -> pa.RecordBatch:
        """The batch's rollouts; exactly one for each of its rollout ids."""
        rollouts = concat_batches(self.generators.collect(in_flight.pending))
        expected = in_flight.batch.column("rollout_id").to_pylist()
        got = rollouts.column("rollout_id").to_pylist()
        if sorted(got) != sorted(expected) or len(set(got)) != len(got):
            raise RuntimeError(
                f"generators returned rollout ids {id_range(rollouts)} ({len(got)} rows), "
                f"expected {len(expected)} distinct ids"
            )
        return rollouts

    def score(self, rollouts: pa.RecordBatch) -> pa.RecordBatch:
        """The rollouts scored by the reward actors (plus ``overlong_penalty``, when set)."""
        pending = self.rewards.dispatch("score", split_batch(rollouts, len(self.rewards.actors)))
        self._dispatched(self.rewards)
        return with_overlong_penalty(concat_batches(self.rewards.collect(pending)), self.config)

    @contextmanager
    def generators_asleep(self) -> Iterator[None]:
        """Colocated on GPUs, the generators' engines sleep (free their GPU memory) while the
        learner trains and wake before the weights sync; otherwise nothing happens."""
        if not self.config.colocated_on_gpus:
            yield
            return
        limit = {"timeout_s": self.config.generators.timeout_s, "source": "generators.timeout_s"}
        self.generators.call_all("sleep", **limit)
        try:
            yield
        finally:
            self.generators.call_all("wake_up", **limit)

    def sync_weights_if_needed(self) -> None:
        """Has every generator load the learner's policy when it would otherwise lag more than
        ``max_policy_lag`` versions (see ``sync.needs_sync``); in asynchronous mode whenever
        there is a newer one (it reaches the generators while they sample)."""
        cfg = self.config
        if cfg.mode == "async":
            behind = self.sync.version < self.iteration
        else:
            behind = needs_sync(
                self.iteration, self.sync.version, cfg.max_policy_lag, cfg.one_step_off
            )
        if behind:
            self.sync.publish(self.generators)

    def save_checkpoint(self, cursor: dict[str, Any]) -> None:
        """Checkpoint ``step-<iteration>``; the job state holds the prompt ``cursor`` of the
        first batch not trained on yet, so a resumed job samples it again (with the restored
        policy)."""
        state = {"iteration": self.iteration, **cursor}
        started = time.perf_counter()
        uri = self.learner.save_checkpoint(self.config.checkpoint, state)
        self.metrics.record_checkpoint(time.perf_counter() - started)
        self.checkpoints = [*self.checkpoints[-1:], uri]

    def record_metrics(
        self, scored: pa.RecordBatch, seconds: dict[str, float], queue: deque[InFlight]
    ) -> None:
        tokens = sum(len(ids) for ids in scored.column("response_ids").to_pylist())
        self.metrics.record_iteration(scored.num_rows, tokens, seconds)
        trajectories = TrajectorySummary.of(scored)
        if trajectories is not None:
            self.metrics.record_trajectories(trajectories)
            if line := trajectories.dropped_line(self.iteration):
                logger.warning(line)
        self.metrics.record_prompts(prompt_count(scored))
        self.metrics.set_inflight_rollouts(sum(batch.batch.num_rows for batch in queue))

    def stats_line(self, scored: pa.RecordBatch, learner_stats: dict[str, float]) -> dict[str, Any]:
        versions = scored.column("policy_version").to_pylist()
        ids = scored.column("rollout_id").to_pylist()
        return {
            "iteration": self.iteration,
            "policy_version": self.iteration,
            "samples": scored.num_rows,
            "prompts": prompt_count(scored),
            "rollout_ids": [min(ids), max(ids)],
            "sampled_with_versions": sorted(set(versions)),
            **reward_stats(scored),
            **(summary.stats() if (summary := TrajectorySummary.of(scored)) else {}),
            "generator_restarts": self.generators.restarts,
            "reward_restarts": self.rewards.restarts,
            "learner_restarts": self.learner_restarts,
            **{k: v for k, v in learner_stats.items() if k.startswith(LEARNER_STAT_PREFIXES)},
        }

    # -- start, resume, stop -------------------------------------------------------------------

    def resume(self, uri: str) -> None:
        """Restores learner, prompt cursor and rollout ids from a checkpoint; stats.jsonl keeps
        the lines up to its iteration (a warning names any it lacks, e.g. an ``output_dir``
        that did not survive the restart). Generators get the restored weights before they
        sample. A learner rank that dies meanwhile restarts the learner (``max_restarts``),
        which loads the same checkpoint."""
        config = self.config.checkpoint
        uri = self.with_learner_restarts(lambda: self.learner.resolve_checkpoint(uri, config))
        self.with_learner_restarts(lambda: self.restore(uri))
        self.publish_metrics_targets()
        kept = self.report.keep_through(self.iteration)
        if [i for i in kept if i > 0] != list(range(1, self.iteration + 1)):
            logger.warning(
                "%s holds the lines of iterations %s, not 1..%d of checkpoint %s: the lines of "
                "the iterations before it are missing",
                self.report.stats_path,
                kept,
                self.iteration,
                uri,
            )

    def restore(self, uri: str | None) -> None:
        """The learner, iteration and prompt cursor of checkpoint ``uri``; None: the model
        directory's policy (the learner as started) at iteration 0."""
        if uri is None:
            self.iteration = 0
            self.prompts.load_state(self.initial_cursor)
            self.checkpoints = []
            return
        state = self.learner.load_checkpoint(uri, self.config.checkpoint)
        self.iteration = state["iteration"]
        self.prompts.load_state(state)
        self.checkpoints = [uri]

    def restart_learner(self, failure: ActorWaitError) -> None:
        """Replaces every learner rank after ``failure`` (one rank died or stalled: the others
        are stuck in its collectives), restores the newest committed checkpoint of this run,
        drops the stats lines after it and has every generator load the restored policy."""
        self.replace_learner(failure)
        newest = (
            self.learner.newest_committed(self.checkpoints, self.config.checkpoint)
            if self.checkpoints
            else None
        )
        self.restore(newest)
        self.report.keep_through(self.iteration)
        self.sync.publish(self.generators)
        self.publish_metrics_targets()

    def with_learner_restarts(
        self, action: Callable[[], Any], failure: ActorWaitError | None = None
    ) -> Any:
        """``action()``'s result, the learner replaced (``replace_learner``) after ``failure``
        and each time a learner rank dies or stalls in ``action`` or in its replacement's
        start: for start-up and resume, before this run trained anything."""
        while True:
            try:
                if failure is not None:
                    self.replace_learner(failure)
                return action()
            except ActorWaitError as error:
                if not error.learner_failed:
                    raise
                failure = error

    def replace_learner(self, failure: ActorWaitError) -> None:
        """New learner ranks, from the model directory, in place of those of ``failure``,
        counted against ``learner.max_restarts``; a rank whose constructor failed as in the
        start before raises ``ActorCannotStart`` at once (``common.start_errors``)."""
        rank = failure.actors[0] if failure.actors else "the learner"
        stop_if_repeated(rank, failure.start_error, self.learner_start_error)
        self.learner_start_error = failure.start_error
        limit = self.config.learner.max_restarts
        if self.learner_restarts >= limit:
            raise LearnerRestartsExhausted(
                f"the learner failed after {self.learner_restarts} restarts "
                f"(learner.max_restarts {limit}): {failure}"
            ) from failure
        self.learner_restarts += 1
        self.metrics.record_actor_restart("learner")
        logger.warning(
            "restarting the learner (%d of %d): %s", self.learner_restarts, limit, failure
        )
        self.learner.kill_ranks()
        self.learner = self.start_learner()
        wait_all(self.learner.ready_calls(), self.learner.deadline_s, "at restart")

    def publish_metrics_targets(self) -> None:
        """Lists the driver's, the learner's and every actor's metrics endpoint for Prometheus
        (again after a restart)."""
        if self.metrics_targets.enabled:
            own = [self.metrics.target, self.learner.metrics_target()]
            actors = [actor for pool in self._pools() for actor in pool.actors]
            self.metrics_targets.publish(own, actors)

    def shutdown(self) -> None:
        """Stops every actor; Prometheus is first told to forget the job's endpoints (unless
        another job of the same name wrote the discovery file since)."""
        self.metrics_targets.remove()
        self.learner.kill()
        self._kill_pools()
        self.metrics.close()
        self.report.close()

    def _pools(self) -> list[ActorPool]:
        optional = [pool for pool in (self.eval_rewards, self.envs) if pool is not None]
        return [self.generators, self.rewards, *optional]

    def _kill_pools(self) -> None:
        for pool in self._pools():
            for actor in pool.actors:
                ray.kill(actor, no_restart=True)

    def _dispatched(self, pool: ActorPool) -> None:
        if self.on_dispatch:
            self.on_dispatch(pool.kind, self.iteration, pool.actors)

    def _on_generator_restart(self, index: int, actor: Any) -> None:
        self.metrics.record_actor_restart("generator")
        self.publish_metrics_targets()
        self.sync.load_into_restarted(index, actor)

    def _on_reward_restart(self, index: int, actor: Any) -> None:
        self.metrics.record_actor_restart("reward")
        self.publish_metrics_targets()
