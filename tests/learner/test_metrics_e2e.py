"""Metrics end to end: a real PPO job on local Ray (vLLM generators, reward actors, the learner)
is scraped by a real Prometheus that finds every process through the job's file_sd file. Every
query of the shipped Grafana dashboard returns data (but the multi-turn row's: tests/deploy/
test_dashboard.py runs a multi-turn job for those), and what Prometheus holds agrees with the
job's own stats.jsonl."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support.prometheus_server import (
    MULTI_TURN_ROW,
    PrometheusServer,
    Result,
    dashboard_queries,
    expand_dashboard_variables,
    values_by,
)

from rlfleet.common.config import JobConfig
from rlfleet.common.metrics import file_sd_path
from rlfleet.job.metrics import STAGES
from rlfleet.learner.metrics import PPO_STAT_GAUGES

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
PROMPTS = REPO / "examples" / "demo_prompts.jsonl"
JOB = "metrics-e2e"
ITERATIONS, BATCH_SIZE, GENERATORS, REWARD_ACTORS = 3, 8, 2, 2
TARGETS = {"job": 1, "learner": 1, "generator": GENERATORS, "reward": REWARD_ACTORS}


def metrics_job(model_dir: Path, out: Path, sd_dir: Path) -> JobConfig:
    """3 iterations of 8 prompts x 8 tokens over 2 generators and 2 reward actors, one
    checkpoint at the end, metrics discovered through ``sd_dir``."""
    return JobConfig.model_validate(
        {
            "name": JOB,
            "model": str(model_dir),
            "dataset": {"path": str(PROMPTS)},
            "generators": {"num_actors": GENERATORS, "num_cpus": 0.5, "max_new_tokens": 8},
            "reward": {
                "function": "rlfleet.reward.functions:sentiment",
                "num_actors": REWARD_ACTORS,
                "num_cpus": 0.5,
            },
            "learner": {"num_cpus": 0.5},
            "ppo": {"batch_size": BATCH_SIZE, "mini_batch_size": 4, "ppo_epochs": 1},
            "iterations": ITERATIONS,
            "output_dir": str(out),
            "checkpoint": {"uri": str(out / "checkpoints")},
            "metrics": {"file_sd_dir": str(sd_dir)},
        }
    )


def weights_nbytes(model_dir: Path) -> int:
    """The size of one published policy version of the model in ``model_dir``."""
    from transformers import AutoModelForCausalLM

    from rlfleet.common.transport.packing import pack_state_dict

    return pack_state_dict(AutoModelForCausalLM.from_pretrained(model_dir).state_dict(), 0).nbytes


def test_every_dashboard_query_has_data_and_counters_match_stats_jsonl_across_a_restart(
    ray_local,
    tiny_model_dir: Path,
    tmp_path: Path,
    prometheus: PrometheusServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reward actor 1 is killed while it scores the first batch: the job restarts it and
    rewrites the discovery file, so Prometheus scrapes the new process in its place."""
    import ray

    from rlfleet.job.loop import TrainingJob

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # vLLM leaves sockets there
    killed = []

    def kill_reward_actor_once(kind: str, iteration: int, actors: list) -> None:
        if (kind, iteration) == ("reward", 0):
            ray.kill(actors[1], no_restart=True)
            killed.append(iteration)

    config = metrics_job(tiny_model_dir, tmp_path / "run", prometheus.sd_dir)
    sd_file = file_sd_path(JOB, prometheus.sd_dir)
    started = time.time()
    job = TrainingJob(config, on_dispatch=kill_reward_actor_once)
    try:
        listed = [group["labels"]["role"] for group in json.loads(sd_file.read_text())]
        assert {role: listed.count(role) for role in TARGETS} == TARGETS
        prometheus.wait_for_targets(JOB, count=sum(TARGETS.values()), timeout=60)
        job.train()
        assert killed == [0]
        prometheus.wait_for_scrapes_after(JOB, time.time())
        at = time.time()
        # A rate window over the whole job (Grafana's $__rate_interval grows with the range).
        rate_interval = f"{math.ceil(at - started) + 5}s"
        results = [
            (title, prometheus.query(expand_dashboard_variables(promql, JOB, rate_interval), at))
            for title, promql in dashboard_queries(skip_rows={MULTI_TURN_ROW})  # single-turn
        ]

        def query(promql: str, label: str = "") -> dict[str, float]:
            """{``label`` value: value} of ``promql`` at ``at``; its first ``{`` opens the
            label matchers, to which this job's is added."""
            return values_by(prometheus.query(promql.replace("{", f'{{job="{JOB}",', 1), at), label)

        check_counters_against_stats(query, tmp_path / "run", tiny_model_dir)
    finally:
        job.shutdown()

    for title, result in results:
        assert result, f"dashboard query {title!r} returned no data"
        assert all_finite(result), f"dashboard query {title!r} returned {result}"
    assert not sd_file.exists()
    prometheus.wait_for_targets(JOB, count=0)


def check_counters_against_stats(
    query: Callable[..., dict[str, float]], out: Path, model_dir: Path
) -> None:
    """What Prometheus holds (``query``: the job's series by a label) = what stats.jsonl says."""
    stats = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    last = stats[-1]
    assert [line["reward_restarts"] for line in stats] == [1] * ITERATIONS
    samples = sum(line["samples"] for line in stats)
    tokens = round(sum(line["response_length_mean"] * line["samples"] for line in stats))
    assert samples == ITERATIONS * BATCH_SIZE
    per_actor = {str(i): ITERATIONS * BATCH_SIZE / GENERATORS for i in range(GENERATORS)}
    calls_per_generator = {str(i): ITERATIONS for i in range(GENERATORS)}

    assert query("sum(rlfleet_job_samples_total{})") == {"": samples}
    # The killed reward actor had scored nothing; its replacement scored the shard again.
    assert query("sum(rlfleet_reward_samples_total{})") == {"": samples}
    assert query("sum(rlfleet_reward_value_count{})") == {"": samples}
    assert query("rlfleet_generator_rollouts_total{}", "index") == per_actor
    assert query("sum(rlfleet_job_tokens_total{})") == {"": tokens}
    assert query("sum(rlfleet_generator_tokens_total{})") == {"": tokens}
    assert query("rlfleet_generator_generation_seconds_count{}", "index") == calls_per_generator
    assert query("rlfleet_reward_scoring_seconds_count{}", "index") == {
        str(i): ITERATIONS for i in range(REWARD_ACTORS)
    }

    assert query("rlfleet_learner_iteration{}") == {"": last["iteration"]} == {"": ITERATIONS}
    assert query("rlfleet_learner_policy_version{}") == {"": last["policy_version"]}
    assert query("rlfleet_generator_policy_version{}", "index") == {
        str(i): last["policy_version"] for i in range(GENERATORS)
    }
    for key, (name, _) in PPO_STAT_GAUGES.items():
        assert query(f"{name}{{}}") == {"": last[key]}, key
    assert query("rlfleet_learner_step_seconds_count{}") == {"": ITERATIONS}
    assert query("rlfleet_learner_weight_broadcast_seconds_count{}") == {"": ITERATIONS}
    assert query("rlfleet_learner_weight_broadcast_bytes{}") == {"": weights_nbytes(model_dir)}
    assert query("rlfleet_generator_weight_load_seconds_count{}", "index") == calls_per_generator

    for stage in STAGES:
        seconds = query(f'rlfleet_job_stage_seconds_sum{{stage="{stage}"}}')
        assert seconds == {"": pytest.approx(sum(line[f"time/{stage}_s"] for line in stats))}
        assert query(f'rlfleet_job_stage_seconds_count{{stage="{stage}"}}') == {"": ITERATIONS}
    assert query("rlfleet_job_actors_alive{}", "actor_role") == {
        "generator": GENERATORS,
        "reward": REWARD_ACTORS,
        "learner": 1,
    }
    assert query("rlfleet_job_actor_restarts_total{}", "actor_role") == {
        "generator": last["generator_restarts"],
        "reward": last["reward_restarts"],
        "learner": 0,
    }
    assert query("rlfleet_job_inflight_rollouts{}") == {"": 0}
    assert query("rlfleet_job_checkpoint_seconds_count{}") == {"": 1}
    assert query("sum by (role) (up{})", "role") == TARGETS


def all_finite(result: Result) -> bool:
    return all(math.isfinite(float(series["value"][1])) for series in result)


def test_a_job_with_metrics_disabled_serves_nothing_and_writes_no_discovery_file(
    ray_local, tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray

    from rlfleet.job.loop import TrainingJob

    monkeypatch.setenv("TMPDIR", str(tmp_path))
    sd_dir = tmp_path / "sd"
    raw = metrics_job(tiny_model_dir, tmp_path / "run", sd_dir).model_dump(exclude_unset=True)
    raw.update(iterations=1, metrics={"enabled": False, "file_sd_dir": str(sd_dir)})
    raw["generators"]["num_actors"] = raw["reward"]["num_actors"] = 1
    job = TrainingJob(JobConfig.model_validate(raw))
    try:
        actors = [job.learner.ranks[0], *job.generators.actors, *job.rewards.actors]
        assert ray.get([actor.metrics_target.remote() for actor in actors]) == [None] * 3
        assert job.metrics.served_target is None
        assert len(job.train().stats) == 1
    finally:
        job.shutdown()
    assert not sd_dir.exists()
