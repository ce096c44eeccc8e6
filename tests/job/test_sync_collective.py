"""The collective weight sync in a real local Ray (gloo on CPU): a small learner actor with the
collective publisher, real generator actors. After every sync each generator's greedy output is
the learner's; a generator that dies in the middle of a broadcast, or stalls, fails that sync
within the deadline, is named, restarted and rejoins; an engine that cannot load fails loudly."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import ray
from support.probes import generator_greedy, generator_version, learner_greedy
from weight_learner import (
    WeightLearner,
    arm_generator_death,
    arm_generator_stall,
    break_generator_engine,
    keep_generator_busy,
)

from rlfleet.actors.generator import RemoteGenerator, generator_options
from rlfleet.common.config import GeneratorConfig, MetricsConfig, WeightSyncConfig
from rlfleet.job.pool import ActorPool
from rlfleet.job.sync import REPORT_GRACE_S, WeightSync
from rlfleet.learner.rank_group import LearnerGroup

pytestmark = pytest.mark.slow

PROBE = [[5, 6, 7], [8, 9, 10, 11, 12, 13], [14], list(range(20, 60))]


def start(
    model_dir: Path,
    engine: str,
    timeout_s: float,
    dtype: str = "float32",
    bucket_mb: float = 0.25,
    generators: int = 2,
    tensor_parallel_size: int = 1,
    env: dict[str, str] | None = None,
) -> tuple[object, WeightSync, ActorPool]:
    """A learner (one rank) and ``generators`` generators with the collective transport, the
    sync's pool restarting dead generators as the job's does; ``env``: the generators'."""
    weight_sync = WeightSyncConfig(transport="collective", bucket_mb=bucket_mb, timeout_s=timeout_s)
    learner = WeightLearner.remote(str(model_dir), weight_sync, dtype)
    config = GeneratorConfig(
        engine=engine,
        num_cpus=0.5,
        max_new_tokens=8,
        kv_cache_gib=0.125,
        dtype=dtype,
        tensor_parallel_size=tensor_parallel_size,
    )
    sync = WeightSync(LearnerGroup([learner], timeout_s), weight_sync, "gloo", tensor_parallel_size)
    options = {**generator_options(config), "runtime_env": {"env_vars": env or {}}}

    def create(index: int):
        return RemoteGenerator.options(**options).remote(
            index,
            str(model_dir),
            config,
            0,
            metrics=MetricsConfig(enabled=False),
            weight_transport=weight_sync,
        )

    pool = ActorPool("generator", create, generators, on_restart=sync.load_into_restarted)
    pool.wait_ready()
    return learner, sync, pool


def stop(ray, learner, pool: ActorPool) -> None:
    for actor in [learner, *pool.actors]:
        ray.kill(actor, no_restart=True)


def assert_generators_hold(ray, learner, pool: ActorPool, version: int, atol: float) -> None:
    mine = learner_greedy(learner, PROBE, 8)
    for generator in pool.actors:
        assert generator_version(generator) == version
        for theirs, want in zip(generator_greedy(generator, PROBE, 8), mine, strict=True):
            assert theirs.token_ids == want["token_ids"]
            assert theirs.logprobs == pytest.approx(want["logprobs"], abs=atol)


@pytest.mark.parametrize(
    ("dtype", "atol"),
    # measured over 3 syncs x 2 generators x 4 prompts x 8 tokens: float32 at most 4.8e-7,
    # bfloat16 (learner and engine) 4.0e-3; bf16 logits of magnitude 2..4 are 2**-6 apart
    [("float32", 1e-4), ("bfloat16", 2**-6)],
)
def test_after_every_collective_sync_the_generators_greedy_output_is_the_learners(
    ray_local, tiny_model_dir, dtype, atol
):
    learner, sync, pool = start(tiny_model_dir, "vllm", timeout_s=60, dtype=dtype)
    try:
        before = learner_greedy(learner, PROBE, 8)
        for version in (1, 2):
            assert ray_local.get(learner.step.remote()) == version
            sync.publish(pool)
            assert sync.version == version
            assert_generators_hold(ray_local, learner, pool, version, atol)
        assert sync.failures == []
        changed = [a != b for a, b in zip(before, learner_greedy(learner, PROBE, 8), strict=True)]
        assert all(changed), "the steps did not move the policy: the check would prove nothing"
    finally:
        stop(ray_local, learner, pool)


def test_a_learner_of_two_ranks_sends_from_rank_0_while_rank_1_takes_part(
    ray_local, tiny_model_dir
):
    weight_sync = WeightSyncConfig(transport="collective", bucket_mb=0.25, timeout_s=30)
    ranks = [
        WeightLearner.remote(str(tiny_model_dir), weight_sync, sender=rank == 0) for rank in (0, 1)
    ]
    config = GeneratorConfig(engine="hf", num_cpus=0.5, max_new_tokens=8)
    generator = RemoteGenerator.options(**generator_options(config)).remote(
        0,
        str(tiny_model_dir),
        config,
        0,
        metrics=MetricsConfig(enabled=False),
        weight_transport=weight_sync,
    )
    pool = ActorPool("generator", lambda i: generator, 1)
    sync = WeightSync(LearnerGroup(ranks, 30), weight_sync, backend="gloo")
    try:
        ray_local.get([rank.step.remote() for rank in ranks])
        sync.publish(pool)
        assert sync.version == 1 and generator_version(generator) == 1
        tensors = len(load_model_state_names(tiny_model_dir))
        assert ray_local.get([rank.tensors_taken.remote() for rank in ranks]) == [tensors] * 2
    finally:
        for actor in [*ranks, generator]:
            ray_local.kill(actor, no_restart=True)


def load_model_state_names(model_dir: Path) -> list[str]:
    from transformers import AutoModelForCausalLM

    return list(AutoModelForCausalLM.from_pretrained(str(model_dir)).state_dict())


def test_a_generator_that_dies_during_a_broadcast_is_named_restarted_and_rejoins(
    ray_local, tiny_model_dir
):
    timeout_s = 20.0
    learner, sync, pool = start(tiny_model_dir, "hf", timeout_s)
    try:
        ray_local.get(learner.step.remote())
        sync.publish(pool)
        arm_generator_death(pool.actors[0], after_buckets=1)
        ray_local.get(learner.step.remote())

        started = time.monotonic()
        sync.publish(pool)

        [failure] = sync.failures
        assert failure.blamed == {0: "died while syncing weights"}
        assert pool.restarts == 1
        assert sync.version == 2
        assert_generators_hold(ray_local, learner, pool, 2, 1e-4)
        assert (
            time.monotonic() - started < timeout_s
        )  # a death is seen at once, not at the deadline
        # the learner stays usable: the next sync goes through the new group
        ray_local.get(learner.step.remote())
        sync.publish(pool)
        assert [generator_version(g) for g in pool.actors] == [3, 3]
    finally:
        stop(ray_local, learner, pool)


def arm_engine_worker_death(generator, worker: int, after_buckets: int) -> None:
    """Worker ``worker`` of the generator's tensor-parallel vLLM engine (a process of its own)
    exits once it has received ``after_buckets`` buckets of its next sync. The function goes to
    the workers pickled, so the generator needs ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``."""

    def arm_worker(vllm_worker, worker: int, after_buckets: int) -> None:
        import os

        if vllm_worker.rank != worker:
            return
        receiver = vllm_worker.rlfleet_receiver
        receive = receiver.receive

        def dying_receive(handle):
            for count, bucket in enumerate(receive(handle)):
                if count == after_buckets:
                    os._exit(1)
                yield bucket

        receiver.receive = dying_receive

    def arm(actor, worker: int, after_buckets: int) -> None:
        actor._engine._llm.collective_rpc(arm_worker, args=(worker, after_buckets))

    ray.get(generator.__ray_call__.remote(arm, worker, after_buckets))


def test_a_tensor_parallel_generator_receives_on_every_worker_and_a_dead_worker_is_named(
    ray_local, tiny_model_dir
):
    """A generator whose vLLM engine runs 2 tensor-parallel workers (processes of their own,
    ranks 1 and 2 of the group): each receives every bucket and loads its shard; the engine's
    greedy output is the learner's. A worker that dies in the middle of a broadcast fails the
    sync at once, naming the generator, which is restarted and rejoins."""
    timeout_s = 30.0
    learner, sync, pool = start(
        tiny_model_dir,
        "vllm",
        timeout_s,
        generators=1,
        tensor_parallel_size=2,
        env={"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"},
    )
    try:
        ray_local.get(learner.step.remote())
        sync.publish(pool)
        assert_generators_hold(ray_local, learner, pool, 1, 1e-4)
        assert sync.failures == []
        arm_engine_worker_death(pool.actors[0], worker=1, after_buckets=1)
        ray_local.get(learner.step.remote())

        sync.publish(pool)

        [failure] = sync.failures
        [(index, why)] = failure.blamed.items()
        assert index == 0
        assert re.fullmatch(
            r"failed syncing weights: .*a worker of the 2-worker vLLM engine died or did not "
            r"answer rlfleet_receive_weights within 40 s: .*",
            why,
        )
        assert failure.seconds < timeout_s  # a death is seen at once, not at the deadline
        assert pool.restarts == 1
        assert_generators_hold(ray_local, learner, pool, 2, 1e-4)
    finally:
        stop(ray_local, learner, pool)


def test_a_generator_that_stalls_during_a_broadcast_is_named_within_the_deadline_and_restarted(
    ray_local, tiny_model_dir
):
    timeout_s = 3.0
    learner, sync, pool = start(tiny_model_dir, "hf", timeout_s)
    try:
        ray_local.get(learner.step.remote())
        sync.publish(pool)  # the group is formed
        stalled = pool.actors[1]
        arm_generator_stall(stalled, after_buckets=1, seconds=300)
        ray_local.get(learner.step.remote())

        sync.publish(pool)

        [failure] = sync.failures
        assert failure.blamed == {
            1: "did not answer within weight_sync.timeout_s (3 s) while syncing weights"
        }
        # judged at the deadline, plus the driver's grace for the members' errors to come back
        assert timeout_s <= failure.seconds < timeout_s + REPORT_GRACE_S + 1.0
        assert pool.restarts == 1 and pool.actors[1] is not stalled
        assert_generators_hold(ray_local, learner, pool, 2, 1e-4)
    finally:
        stop(ray_local, learner, pool)


def test_a_generator_still_busy_when_a_sync_starts_is_named_before_the_broadcast(
    ray_local, tiny_model_dir
):
    learner, sync, pool = start(tiny_model_dir, "hf", timeout_s=3.0)
    try:
        keep_generator_busy(pool.actors[0], 300)
        ray_local.get(learner.step.remote())
        sync.publish(pool)
        [failure] = sync.failures
        assert failure.blamed == {
            0: "did not answer within weight_sync.timeout_s (3 s) while finishing earlier calls"
        }
        assert pool.restarts == 1
        assert [generator_version(g) for g in pool.actors] == [1, 1]
    finally:
        stop(ray_local, learner, pool)


def test_an_engine_that_cannot_load_the_weights_fails_the_sync_loudly(ray_local, tiny_model_dir):
    learner, sync, pool = start(tiny_model_dir, "hf", timeout_s=5.0)
    try:
        break_generator_engine(pool.actors[1])
        ray_local.get(learner.step.remote())
        with pytest.raises(
            RuntimeError,
            match=r"generator 1: its hf engine could not load the published weights: KeyError",
        ):
            sync.publish(pool)
        assert pool.restarts == 0
    finally:
        stop(ray_local, learner, pool)


def test_a_job_goes_on_after_a_generator_dies_during_a_broadcast_with_every_rollout_once(
    ray_local, tiny_model_dir, tmp_path
):
    """The whole job (real learner and vLLM generators) with the collective transport:
    generator 1 dies in the middle of the second sync; it is restarted, rejoins, and every
    rollout is trained on exactly once."""
    from support.job_configs import small_job

    from rlfleet.job.train import run_job

    def die_in_next_sync(kind: str, iteration: int, actors: list) -> None:
        if kind == "generator" and iteration == 1:
            arm_generator_death(actors[1], after_buckets=1)

    config = small_job(
        tiny_model_dir,
        tmp_path / "run",
        generators={"num_actors": 2},
        weight_sync={"transport": "collective", "bucket_mb": 0.25, "timeout_s": 60},
        iterations=3,
    )
    result = run_job(config, on_dispatch=die_in_next_sync)

    stats = [
        json.loads(line) for line in (tmp_path / "run" / "stats.jsonl").read_text().splitlines()
    ]
    assert result.generator_restarts == 1
    assert [line["sampled_with_versions"] for line in stats] == [[0], [1], [2]]
    assert result.consumed_rollout_ids == list(range(24))
