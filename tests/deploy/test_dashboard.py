"""The shipped Grafana dashboard and Prometheus configs: every panel query names only metrics
that a job's metric sets define, parses in a real Prometheus, and the configs are valid."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from support.prometheus_server import (
    DASHBOARD,
    REPO,
    PrometheusError,
    PrometheusServer,
    dashboard_queries,
    expand_dashboard_variables,
)

from rlfleet.actors.metrics import GeneratorMetrics
from rlfleet.common.metrics import DEFAULT_FILE_SD_DIR, MetricSet, write_file_sd
from rlfleet.job.metrics import ACTOR_ROLES, METRIC_SETS, STAGES, JobMetrics
from rlfleet.learner.metrics import PPO_STAT_GAUGES, LearnerMetrics
from rlfleet.reward.metrics import RewardMetrics

GRAFANA = REPO / "deploy" / "grafana"
PROMETHEUS_CONFIGS = sorted((REPO / "deploy" / "prometheus").glob("*.yml"))
PROMQL_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool"}
PROMQL_KEYWORDS |= {"and", "or", "unless", "offset", "inf", "nan"}
LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
IDENTIFIER = re.compile(r"(?<![\w.$])[A-Za-z_:][A-Za-z0-9_:]*")


def promql_metric_names(promql: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not functions,
    keywords, labels, strings or durations."""
    promql = re.sub(r'"(?:[^"\\]|\\.)*"', '""', promql)
    promql = re.sub(r"\{[^}]*\}", " ", promql)
    promql = re.sub(r"\[[^\]]*\]", " ", promql)
    promql = LABEL_LIST.sub(" ", promql)
    return {
        match.group()
        for match in IDENTIFIER.finditer(promql)
        if not promql[match.end() :].lstrip().startswith("(")
        and match.group().lower() not in PROMQL_KEYWORDS
    }


def defined_metric_names() -> set[str]:
    """Every series name the metric sets of a job (``METRIC_SETS``) expose."""
    return {
        sample.name
        for metric_set in METRIC_SETS
        for family in metric_set("dashboard-check", 0).registry.collect()
        for sample in family.samples
    }


def load_dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_metric_names_are_found_in_promql() -> None:
    promql = (
        'histogram_quantile(0.9, sum by (job, le) (rate(a_bucket{job=~"$job"}[5m]))) '
        '/ on (job) group_left b_total{role="x"} + 1e3 * scalar(c) - d offset 5m'
    )
    assert promql_metric_names(promql) == {"a_bucket", "b_total", "c", "d"}


def test_every_dashboard_query_names_only_defined_metrics() -> None:
    defined = defined_metric_names()
    queries = dashboard_queries()
    assert len(queries) >= 20
    for title, promql in queries:
        names = promql_metric_names(promql)
        assert names, f"panel {title!r}: no metric in {promql!r}"
        assert names <= defined, f"panel {title!r}: undefined {names - defined} in {promql!r}"


def test_dashboard_shows_what_issue_4_asks_for() -> None:
    shown = set().union(*(promql_metric_names(promql) for _, promql in dashboard_queries()))
    required = {
        "rlfleet_job_samples_total",
        "rlfleet_job_tokens_total",
        "rlfleet_learner_mean_reward",
        "rlfleet_learner_kl",
        "rlfleet_learner_kl_coef",
        "rlfleet_job_stage_seconds_sum",
        "rlfleet_learner_weight_broadcast_seconds_sum",
        "rlfleet_generator_weight_load_seconds_sum",
        "rlfleet_learner_policy_version",
        "rlfleet_generator_policy_version",
        "rlfleet_job_actors_alive",
        "rlfleet_job_actor_restarts_total",
        "rlfleet_job_checkpoint_seconds_sum",
    }
    assert required <= shown, f"not on the dashboard: {required - shown}"


def test_dashboard_layout_is_valid() -> None:
    dashboard = load_dashboard()
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {ids}"
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert ref_ids and len(ref_ids) == len(set(ref_ids)), panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_every_dashboard_query_parses_in_prometheus(prometheus: PrometheusServer) -> None:
    for title, promql in dashboard_queries():
        try:
            prometheus.query(expand_dashboard_variables(promql, job="any-job"))
        except PrometheusError as error:
            pytest.fail(f"panel {title!r}: {error}")


def record_once_with_every_method(metric_sets: list[MetricSet]) -> None:
    for metrics in metric_sets:
        if isinstance(metrics, GeneratorMetrics):
            with metrics.busy():
                metrics.record_generation(rollouts=8, tokens=96, seconds=0.2)
            metrics.record_weight_load(seconds=0.1, version=metrics.index)
        elif isinstance(metrics, RewardMetrics):
            metrics.record_scores([0.5, -0.5], seconds=0.01)
            metrics.record_error()
            metrics.record_timeout()
        elif isinstance(metrics, LearnerMetrics):
            metrics.record_step(dict.fromkeys(PPO_STAT_GAUGES, 0.5), seconds=1.0, iteration=1)
            metrics.record_weight_broadcast(seconds=0.05, nbytes=4096, version=1)
        else:
            metrics.record_iteration(16, 192, dict.fromkeys(STAGES, 0.25))
            metrics.set_inflight_rollouts(16)
            for role in ACTOR_ROLES:
                metrics.set_actors_alive(role, 1)
            metrics.record_actor_restart("generator")
            metrics.record_checkpoint(0.5)


@pytest.mark.slow
def test_every_dashboard_query_returns_data_once_every_metric_is_recorded(
    prometheus: PrometheusServer,
) -> None:
    job = "dashboard-e2e"
    metric_sets = [
        GeneratorMetrics(job, 0),
        GeneratorMetrics(job, 1),
        RewardMetrics(job, 0),
        LearnerMetrics(job, 0),
        JobMetrics(job),
    ]
    record_once_with_every_method(metric_sets)
    try:
        write_file_sd(prometheus.sd_file(job), [metrics.serve() for metrics in metric_sets])
        prometheus.wait_for_targets(job, count=len(metric_sets))
        record_once_with_every_method(metric_sets)
        for title, promql in dashboard_queries():
            try:
                prometheus.wait_for(expand_dashboard_variables(promql, job), timeout=20)
            except PrometheusError as error:
                pytest.fail(f"panel {title!r} shows no data: {error}")
    finally:
        for metrics in metric_sets:
            metrics.close()


def test_grafana_provisioning_points_at_prometheus_and_the_dashboard() -> None:
    datasources = yaml.safe_load((GRAFANA / "provisioning/datasources/rlfleet.yml").read_text())
    (prometheus,) = datasources["datasources"]
    assert prometheus["type"] == "prometheus" and prometheus["url"].startswith("http")
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/rlfleet.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert Path(provider["options"]["path"]).name == "rlfleet"


@pytest.mark.parametrize("config", PROMETHEUS_CONFIGS, ids=lambda path: path.name)
def test_shipped_prometheus_config_is_valid(config: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool comes with the prometheus package: apt-get install prometheus"
    checked = subprocess.run(
        [promtool, "check", "config", str(config)], capture_output=True, text=True
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    (rlfleet,) = [
        job
        for job in yaml.safe_load(config.read_text())["scrape_configs"]
        if job["job_name"] == "rlfleet"
    ]
    assert rlfleet["honor_labels"] is True
    assert rlfleet["file_sd_configs"][0]["files"] == [f"{DEFAULT_FILE_SD_DIR}/*.json"]
