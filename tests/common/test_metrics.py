"""common/metrics.py: the metric sets record what they are told, serve it over HTTP, and a real
Prometheus finds Ray actors' endpoints through the file_sd file and reads the exact values."""

from __future__ import annotations

import json
import stat
import urllib.request

import numpy as np
import pytest
import ray
import torch
from prometheus_client.parser import text_string_to_metric_families
from prometheus_server import (
    PrometheusServer,
    dashboard_queries,
    expand_dashboard_variables,
    values_by,
)

from rlfleet.common.config import MetricsConfig
from rlfleet.common.metrics import (
    DEFAULT_FILE_SD_DIR,
    METRIC_SETS,
    PPO_STAT_GAUGES,
    GeneratorMetrics,
    JobMetrics,
    LearnerMetrics,
    MetricsTarget,
    RewardMetrics,
    file_sd_path,
    write_file_sd,
)

PPO_STATS = {
    "objective/kl": 0.5,
    "objective/kl_coef": 0.2,
    "ppo/loss/policy": -0.125,
    "ppo/loss/value": 0.25,
    "ppo/loss/total": 0.0,
    "ppo/policy/clipfrac": 0.0625,
    "ppo/policy/entropy": 3.5,
    "ppo/policy/approxkl": 0.01,
    "ppo/val/clipfrac": 0.5,
    "ppo/mean_scores": 0.75,
    "ppo/std_scores": 1.5,
    "objective/kl_dist": np.array([0.5, 0.5]),
}
"""What a TRL-style step returns: every mapped key, plus an array the metrics do not read."""


def sample(metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {**metrics.labels, **labels})


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


def test_generator_records_rollouts_tokens_latency_version_and_busy() -> None:
    metrics = GeneratorMetrics("demo", 1)
    metrics.record_generation(rollouts=8, tokens=96, seconds=0.25)
    metrics.record_generation(rollouts=4, tokens=40, seconds=0.5)
    metrics.record_weight_load(seconds=0.125, version=3)
    assert sample(metrics, "rlfleet_generator_rollouts_total") == 12
    assert sample(metrics, "rlfleet_generator_tokens_total") == 136
    assert sample(metrics, "rlfleet_generator_generation_seconds_count") == 2
    assert sample(metrics, "rlfleet_generator_generation_seconds_sum") == 0.75
    assert sample(metrics, "rlfleet_generator_generation_seconds_bucket", le="0.25") == 1
    assert sample(metrics, "rlfleet_generator_weight_load_seconds_sum") == 0.125
    assert sample(metrics, "rlfleet_generator_policy_version") == 3
    assert sample(metrics, "rlfleet_generator_busy") == 0
    with pytest.raises(RuntimeError), metrics.busy():
        assert sample(metrics, "rlfleet_generator_busy") == 1
        raise RuntimeError("engine failed")
    assert sample(metrics, "rlfleet_generator_busy") == 0


def test_reward_records_samples_distribution_errors_and_timeouts() -> None:
    metrics = RewardMetrics("demo", 0)
    metrics.record_scores([0.5, -0.25, 1.0], seconds=0.01)
    metrics.record_error()
    metrics.record_timeout()
    metrics.record_timeout()
    assert sample(metrics, "rlfleet_reward_samples_total") == 3
    assert sample(metrics, "rlfleet_reward_scoring_seconds_count") == 1
    assert sample(metrics, "rlfleet_reward_value_count") == 3
    assert sample(metrics, "rlfleet_reward_value_bucket", le="0.0") == 1
    assert sample(metrics, "rlfleet_reward_value_bucket", le="0.5") == 2
    assert sample(metrics, "rlfleet_reward_errors_total") == 1
    assert sample(metrics, "rlfleet_reward_timeouts_total") == 2
    with pytest.raises(ValueError, match="sample 1 is nan"):
        metrics.record_scores([0.0, float("nan")], seconds=0.01)
    assert sample(metrics, "rlfleet_reward_samples_total") == 3


def test_learner_maps_ppo_stats_to_gauges() -> None:
    metrics = LearnerMetrics("demo", 0)
    stats = {**PPO_STATS, "objective/kl": torch.tensor(0.5), "ppo/loss/value": np.float32(0.25)}
    metrics.record_step(stats, seconds=1.5, iteration=7)
    for key, (name, _) in PPO_STAT_GAUGES.items():
        assert sample(metrics, name) == PPO_STATS[key], key
    assert sample(metrics, "rlfleet_learner_step_seconds_sum") == 1.5
    assert sample(metrics, "rlfleet_learner_iteration") == 7
    metrics.record_weight_broadcast(seconds=0.0625, nbytes=1_000_000, version=7)
    assert sample(metrics, "rlfleet_learner_weight_broadcast_seconds_sum") == 0.0625
    assert sample(metrics, "rlfleet_learner_weight_broadcast_bytes") == 1_000_000
    assert sample(metrics, "rlfleet_learner_policy_version") == 7


def test_learner_rejects_missing_and_non_scalar_stats_naming_the_key() -> None:
    metrics = LearnerMetrics("demo", 0)
    with pytest.raises(ValueError, match="ppo/std_scores"):
        metrics.record_step({k: v for k, v in PPO_STATS.items() if k != "ppo/std_scores"}, 1.0, 1)
    with pytest.raises(ValueError, match="'objective/kl' must be a single number"):
        metrics.record_step({**PPO_STATS, "objective/kl": np.array([0.1, 0.2])}, 1.0, 1)
    assert sample(metrics, "rlfleet_learner_kl") == 0
    assert sample(metrics, "rlfleet_learner_step_seconds_count") == 0


def test_job_records_throughput_stages_actors_restarts_and_checkpoints() -> None:
    metrics = JobMetrics("demo")
    assert sample(metrics, "rlfleet_job_actor_restarts_total", actor_role="reward") == 0
    stages = {"generate": 2.0, "score": 0.5, "train": 1.25, "sync": 0.25}
    metrics.record_iteration(samples=16, tokens=200, stage_seconds=stages)
    metrics.record_iteration(samples=16, tokens=180, stage_seconds=stages)
    metrics.set_inflight_rollouts(16)
    metrics.set_actors_alive("generator", 3)
    metrics.record_actor_restart("generator")
    metrics.record_checkpoint(4.0)
    assert sample(metrics, "rlfleet_job_samples_total") == 32
    assert sample(metrics, "rlfleet_job_tokens_total") == 380
    for stage, seconds in stages.items():
        assert sample(metrics, "rlfleet_job_stage_seconds_sum", stage=stage) == 2 * seconds
    assert sample(metrics, "rlfleet_job_inflight_rollouts") == 16
    assert sample(metrics, "rlfleet_job_actors_alive", actor_role="generator") == 3
    assert sample(metrics, "rlfleet_job_actors_alive", actor_role="learner") == 0
    assert sample(metrics, "rlfleet_job_actor_restarts_total", actor_role="generator") == 1
    assert sample(metrics, "rlfleet_job_checkpoint_seconds_count") == 1


def test_bad_values_are_rejected_naming_the_field() -> None:
    job, generator = JobMetrics("demo"), GeneratorMetrics("demo", 0)
    with pytest.raises(ValueError, match="unknown stage 'eval'"):
        job.record_iteration(1, 1, {"eval": 1.0})
    with pytest.raises(ValueError, match=r"stage_seconds\['sync'\] must be a non-negative"):
        job.record_iteration(1, 1, {"sync": -1.0})
    with pytest.raises(ValueError, match="actor role must be one of"):
        job.set_actors_alive("critic", 1)
    with pytest.raises(ValueError, match="tokens must be a non-negative number, got -3"):
        generator.record_generation(rollouts=1, tokens=-3, seconds=0.1)
    with pytest.raises(ValueError, match="index must be >= 0"):
        GeneratorMetrics("demo", -1)
    assert sample(job, "rlfleet_job_samples_total") == 0
    assert sample(generator, "rlfleet_generator_rollouts_total") == 0


def test_served_endpoint_exposes_the_registry_and_closes() -> None:
    metrics = GeneratorMetrics("demo", 4)
    metrics.record_generation(rollouts=5, tokens=50, seconds=0.1)
    target = metrics.serve()
    try:
        assert (target.host, target.job, target.role, target.index) == (
            "127.0.0.1",
            "demo",
            "generator",
            4,
        )
        assert metrics.serve() == target
        with urllib.request.urlopen(f"http://{target.address}/metrics", timeout=5) as response:
            text = response.read().decode()
    finally:
        metrics.close()
    exposed = {
        s.name: s.value for family in text_string_to_metric_families(text) for s in family.samples
    }
    assert exposed["rlfleet_generator_rollouts_total"] == 5
    assert exposed["rlfleet_generator_tokens_total"] == 50
    with pytest.raises(RuntimeError, match="not served"):
        _ = metrics.target
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{target.address}/metrics", timeout=5)


def test_wildcard_bind_advertises_the_node_address() -> None:
    metrics = JobMetrics("demo")
    target = metrics.serve(host="0.0.0.0")
    try:
        assert target.host == ray.util.get_node_ip_address()
        with urllib.request.urlopen(f"http://{target.address}/metrics", timeout=5) as response:
            assert b"rlfleet_job_samples_total" in response.read()
    finally:
        metrics.close()


def test_from_config_serves_only_when_enabled() -> None:
    served = RewardMetrics.from_config("demo", 3, MetricsConfig())
    try:
        assert (served.target.host, served.target.index) == ("127.0.0.1", 3)
        assert served.served_target == served.target
    finally:
        served.close()
    assert served.served_target is None
    unserved = RewardMetrics.from_config("demo", 3, MetricsConfig(enabled=False))
    unserved.record_timeout()
    assert unserved.served_target is None
    with pytest.raises(RuntimeError, match="not served"):
        _ = unserved.target


def test_file_sd_path_is_one_file_per_job() -> None:
    assert str(file_sd_path("demo-1")) == f"{DEFAULT_FILE_SD_DIR}/demo-1.json"
    with pytest.raises(ValueError, match="job name '../x'"):
        file_sd_path("../x")


def test_file_sd_lists_each_target_with_its_labels_readable_by_all(tmp_path) -> None:
    targets = [
        MetricsTarget("10.0.0.5", 9000, "demo", "generator", 0),
        MetricsTarget("10.0.0.6", 9000, "demo", "generator", 1),
        MetricsTarget("::1", 9100, "demo", "job", 0),
    ]
    path = write_file_sd(tmp_path / "sd" / "demo.json", targets)
    assert json.loads(path.read_text()) == [
        {
            "targets": ["10.0.0.5:9000"],
            "labels": {"job": "demo", "role": "generator", "index": "0"},
        },
        {
            "targets": ["10.0.0.6:9000"],
            "labels": {"job": "demo", "role": "generator", "index": "1"},
        },
        {"targets": ["[::1]:9100"], "labels": {"job": "demo", "role": "job", "index": "0"}},
    ]
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert [p.name for p in path.parent.iterdir()] == ["demo.json"]


def test_file_sd_rejects_a_process_listed_twice_and_keeps_the_old_file(tmp_path) -> None:
    path = write_file_sd(tmp_path / "demo.json", [MetricsTarget("h", 1, "demo", "learner", 0)])
    duplicate = [
        MetricsTarget("h", 2, "demo", "learner", 0),
        MetricsTarget("h", 3, "demo", "learner", 0),
    ]
    with pytest.raises(ValueError, match="share"):
        write_file_sd(path, duplicate)
    assert json.loads(path.read_text())[0]["targets"] == ["h:1"]


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
            learner.record.remote("record_step", PPO_STATS, 1.5, 1),
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
