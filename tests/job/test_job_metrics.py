"""job/metrics.py: the job's own metrics, every metric set of a job, and a real
Prometheus that finds Ray actors' endpoints through the file_sd file and reads the exact values."""

from __future__ import annotations

import pytest
import ray
from support.prometheus_server import (
    PrometheusServer,
    dashboard_queries,
    expand_dashboard_variables,
    values_by,
)

from rlfleet.actors.metrics import GeneratorMetrics
from rlfleet.common.metrics import MetricsTarget, write_file_sd
from rlfleet.job.metrics import METRIC_SETS, JobMetrics
from rlfleet.learner.metrics import PPO_STAT_GAUGES, LearnerMetrics
from rlfleet.reward.metrics import RewardMetrics


def sample(metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {**metrics.labels, **labels})


def test_every_role_has_a_metric_set() -> None:
    assert {metric_set.role for metric_set in METRIC_SETS} == {
        "generator",
        "reward",
        "learner",
        "job",
    }


@pytest.mark.parametrize("metric_set", METRIC_SETS, ids=lambda cls: cls.__name__)
def test_every_series_is_prefixed_and_labelled_with_job_role_index(metric_set) -> None:
    metrics = metric_set("demo", 2)
    samples = [s for family in metrics.registry.collect() for s in family.samples]
    assert samples
    for s in samples:
        assert s.name.startswith("rlfleet_"), s.name
        assert {k: s.labels[k] for k in ("job", "role", "index")} == {
            "job": "demo",
            "role": metric_set.role,
            "index": "2",
        }


def test_job_records_throughput_stages_actors_restarts_and_checkpoints() -> None:
    metrics = JobMetrics("demo")
    assert sample(metrics, "rlfleet_job_actor_restarts_total", actor_role="reward") == 0
    stages = {"generate": 2.0, "score": 0.5, "train": 1.25, "sync": 0.25}
    metrics.record_iteration(samples=16, tokens=200, stage_seconds=stages)
    metrics.record_iteration(samples=16, tokens=180, stage_seconds=stages)
    metrics.record_prompts(4)
    metrics.set_inflight_rollouts(16)
    metrics.set_actors_alive("generator", 3)
    metrics.record_actor_restart("generator")
    metrics.record_checkpoint(4.0)
    assert sample(metrics, "rlfleet_job_samples_total") == 32
    assert sample(metrics, "rlfleet_job_prompts_total") == 4
    assert sample(metrics, "rlfleet_job_tokens_total") == 380
    for stage, seconds in stages.items():
        assert sample(metrics, "rlfleet_job_stage_seconds_sum", stage=stage) == 2 * seconds
    assert sample(metrics, "rlfleet_job_inflight_rollouts") == 16
    assert sample(metrics, "rlfleet_job_actors_alive", actor_role="generator") == 3
    assert sample(metrics, "rlfleet_job_actors_alive", actor_role="learner") == 0
    assert sample(metrics, "rlfleet_job_actor_restarts_total", actor_role="generator") == 1
    assert sample(metrics, "rlfleet_job_checkpoint_seconds_count") == 1


def test_bad_values_are_rejected_naming_the_field() -> None:
    job = JobMetrics("demo")
    with pytest.raises(ValueError, match="unknown stage 'eval'"):
        job.record_iteration(1, 1, {"eval": 1.0})
    with pytest.raises(ValueError, match=r"stage_seconds\['sync'\] must be a non-negative"):
        job.record_iteration(1, 1, {"sync": -1.0})
    with pytest.raises(ValueError, match="actor role must be one of"):
        job.set_actors_alive("critic", 1)
    with pytest.raises(ValueError, match="prompts must be a non-negative"):
        job.record_prompts(-1)
    assert sample(job, "rlfleet_job_samples_total") == 0


@ray.remote(num_cpus=0)
class MetricsProcess:
    """An actor process owning one metric set and serving it, as rlfleet's actors do."""

    def __init__(self, metric_set: type, job: str, index: int) -> None:
        self.metrics = metric_set(job, index)
        self.metrics.serve("127.0.0.1")

    def target(self) -> MetricsTarget:
        return self.metrics.target

    def record(self, method: str, *args, **kwargs) -> None:
        getattr(self.metrics, method)(*args, **kwargs)


def staleness_query(job: str) -> str:
    """The dashboard's staleness panel query (learner version - each generator's version)."""
    (promql,) = [q for title, q in dashboard_queries() if title.startswith("Staleness")]
    return expand_dashboard_variables(promql, job)


@pytest.mark.slow
def test_prometheus_scrapes_actor_endpoints_found_through_file_sd(
    ray_local, prometheus: PrometheusServer
) -> None:
    job = "metrics-e2e"
    generators = [MetricsProcess.remote(GeneratorMetrics, job, i) for i in range(2)]
    reward = MetricsProcess.remote(RewardMetrics, job, 0)
    learner = MetricsProcess.remote(LearnerMetrics, job, 0)
    ray.get(
        [
            generators[0].record.remote("record_generation", 8, 96, 0.25),
            generators[0].record.remote("record_generation", 8, 80, 0.5),
            generators[0].record.remote("record_weight_load", 0.125, 1),
            generators[1].record.remote("record_generation", 4, 40, 0.125),
            reward.record.remote("record_scores", [0.5, -0.25, 1.0], 0.01),
            reward.record.remote("record_timeout"),
            learner.record.remote("record_step", dict.fromkeys(PPO_STAT_GAUGES, 0.5), 1.5, 1),
            learner.record.remote("record_weight_broadcast", 0.0625, 1_000_000, 1),
        ]
    )
    driver = JobMetrics(job)
    driver.record_iteration(samples=20, tokens=216, stage_seconds={"generate": 1.0})
    actors = [*generators, reward, learner]
    targets = [*ray.get([actor.target.remote() for actor in actors]), driver.serve()]
    try:
        write_file_sd(prometheus.sd_file(job), targets)
        prometheus.wait_for_targets(job, count=5, timeout=60)

        def values(promql: str, label: str = "index") -> dict[str, float]:
            return values_by(prometheus.query(promql), label)

        rollouts = prometheus.query(f'rlfleet_generator_rollouts_total{{job="{job}"}}')
        assert {s["metric"]["index"]: float(s["value"][1]) for s in rollouts} == {"0": 16, "1": 4}
        assert all("exported_job" not in s["metric"] for s in rollouts)
        assert values(f'sum(rlfleet_generator_tokens_total{{job="{job}"}})', "") == {"": 216}
        assert values(f'rlfleet_generator_generation_seconds_sum{{job="{job}"}}') == {
            "0": 0.75,
            "1": 0.125,
        }
        assert values(staleness_query(job)) == {"0": 0, "1": 1}
        assert values(f'rlfleet_reward_samples_total{{job="{job}"}}') == {"0": 3}
        assert values(f'rlfleet_reward_timeouts_total{{job="{job}"}}') == {"0": 1}
        assert values(f'rlfleet_learner_kl{{job="{job}"}}') == {"0": 0.5}
        assert values(f'rlfleet_learner_weight_broadcast_bytes{{job="{job}"}}') == {"0": 1e6}
        assert values(f'rlfleet_job_samples_total{{job="{job}"}}', "role") == {"job": 20}
        assert values(f'up{{job="{job}"}}', "role") == {
            "generator": 1,
            "reward": 1,
            "learner": 1,
            "job": 1,
        }

        write_file_sd(prometheus.sd_file(job), [t for t in targets if t.role != "generator"])
        prometheus.wait_for_targets(job, count=3)
    finally:
        driver.close()
        for actor in actors:
            ray.kill(actor)
