"""The shipped Grafana dashboard and Prometheus configs: every panel query names only metrics
that a job's metric sets define, parses in a real Prometheus, and the configs are valid; the
multi-turn row's queries return data after a real multi-turn job with tools, and agree with
its stats.jsonl."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.agent_envs import TOOL
from support.job_configs import read_stats, small_job
from support.prometheus_server import (
    DASHBOARD,
    MULTI_TURN_ROW,
    REPO,
    PrometheusError,
    PrometheusServer,
    dashboard_queries,
    dashboard_rows,
    expand_dashboard_variables,
    values_by,
)

from rlfleet.actors.metrics import GeneratorMetrics
from rlfleet.common.metrics import DEFAULT_FILE_SD_DIR, MetricSet, file_sd_path, write_file_sd
from rlfleet.job.metrics import ACTOR_ROLES, METRIC_SETS, STAGES, JobMetrics
from rlfleet.job.rollout_stats import COUNTED, FINISH_REASONS, TrajectorySummary
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


SERIES_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
}
"""The series of each kind of metric family (a labelled one has none before its first value)."""


def defined_metric_names() -> set[str]:
    """Every series name the metric sets of a job (``METRIC_SETS``) expose."""
    return {
        family.name + suffix
        for metric_set in METRIC_SETS
        for family in metric_set("dashboard-check", 0).registry.collect()
        for suffix in SERIES_SUFFIXES[family.type]
    }


def test_defined_metric_names_include_labelled_series_before_their_first_value() -> None:
    defined = defined_metric_names()
    assert {"rlfleet_job_samples_total", "rlfleet_learner_kl"} <= defined
    assert {f"rlfleet_job_env_turns{suffix}" for suffix in ("_bucket", "_sum", "_count")} <= defined
    assert "rlfleet_job_env_tool_calls_total" in defined


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


ENV_PANELS = {
    "Turns per trajectory",
    "Environment step seconds",
    "Tool calls/s per tool",
    "Tool errors/s per tool",
    "Trajectories/s by finish reason",
    "Masked token fraction",
    "Environment events/s",
}


def test_dashboard_shows_what_the_multi_turn_issue_asks_for() -> None:
    """Turns per trajectory (mean and p95), env step latency, tool calls and errors per tool,
    the masked token fraction, trajectories cut by the token budget and env timeouts."""
    assert set(dashboard_rows()[MULTI_TURN_ROW]) == ENV_PANELS
    queries: dict[str, str] = {}
    for title, promql in dashboard_queries():
        queries[title] = f"{queries.get(title, '')}\n{promql}"
    turns, steps = queries["Turns per trajectory"], queries["Environment step seconds"]
    assert "rlfleet_job_env_turns_sum" in turns and "rlfleet_job_env_turns_count" in turns
    assert "histogram_quantile(0.95, sum by (job, le) (rate(rlfleet_job_env_turns_bucket" in turns
    for quantile in ("0.5", "0.95"):
        assert f"histogram_quantile({quantile}, sum by (job, le) (rate(" in steps
    for panel, metric in [
        ("Tool calls/s per tool", "rlfleet_job_env_tool_calls_total"),
        ("Tool errors/s per tool", "rlfleet_job_env_tool_errors_total"),
    ]:
        assert promql_metric_names(queries[panel].strip()) == {metric}
        assert "sum by (job, tool) (rate(" in queries[panel]
    assert promql_metric_names(queries["Masked token fraction"].strip()) == {
        "rlfleet_job_env_masked_token_fraction"
    }
    assert "sum by (job, event) (rate(" in queries["Environment events/s"]
    (finish,) = [p for p in load_dashboard()["panels"] if p["title"].startswith("Trajectories")]
    exprs = {target["refId"]: target["expr"] for target in finish["targets"]}
    assert 'finish_reason="length"' in exprs["B"] and 'finish_reason="env_timeout"' in exprs["C"]
    highlighted = {o["matcher"]["options"] for o in finish["fieldConfig"]["overrides"]}
    assert highlighted == {"B", "C"}


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
            metrics.record_trajectories(
                TrajectorySummary(
                    turns=[1, 3],
                    step_seconds=[0.01, 0.25],
                    tool_calls=Counter(lookup=3),
                    tool_errors=Counter(lookup=1),
                    finish_reasons=Counter(stop=1, length=1),
                    counters=Counter(malformed_tool_calls=1),
                    masked_tokens=10,
                    tokens=40,
                    turn_rewards=[0.5, 0.0],
                )
            )


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


MULTI_TURN_JOB, MULTI_TURN_ITERATIONS, MULTI_TURN_BATCH = "dashboard-multiturn", 2, 8


@pytest.mark.slow
def test_every_dashboard_query_has_data_after_a_multi_turn_job_with_tools(
    ray_local,
    tiny_model_dir: Path,
    tmp_path: Path,
    prometheus: PrometheusServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real multi-turn job (vLLM generator, an environment actor running
    ``support.agent_envs:LookupToolEnv``, reward actor, learner) scraped by a real Prometheus:
    every query of the dashboard, the multi-turn row's included, returns finite data, and the
    driver's env series agree with stats.jsonl. Trajectories are cut by the token budget (each
    observation is 10-12 tokens: after 2 turns of 6 tokens the second one does not fit) and some
    time out (their first step hangs past ``step_timeout_s``)."""
    from rlfleet.job.loop import TrainingJob

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # vLLM leaves sockets there
    out = tmp_path / "run"
    config = small_job(
        tiny_model_dir,
        out,
        name=MULTI_TURN_JOB,
        env={
            "environment": "support.agent_envs:LookupToolEnv",
            "kwargs": {"turns": 3, "hang_every": 3, "hang_s": 60.0},
            "num_cpus": 0.25,
            "max_turns": 4,
            "max_total_tokens": 30,
            "step_timeout_s": 1.0,
        },
        generators={"max_new_tokens": 6},
        iterations=MULTI_TURN_ITERATIONS,
        checkpoint={"uri": str(out / "checkpoints")},
        metrics={"file_sd_dir": str(prometheus.sd_dir)},
    )
    started = time.time()
    job = TrainingJob(config)
    try:
        prometheus.wait_for_targets(MULTI_TURN_JOB, count=4, timeout=60)
        job.train()
        prometheus.wait_for_scrapes_after(MULTI_TURN_JOB, time.time())
        at = time.time()
        rate_interval = f"{math.ceil(at - started) + 5}s"  # a rate window over the whole job
        results = [
            (
                title,
                promql,
                prometheus.query(
                    expand_dashboard_variables(promql, MULTI_TURN_JOB, rate_interval), at
                ),
            )
            for title, promql in dashboard_queries()
        ]

        def query(promql: str, label: str = "") -> dict[str, float]:
            """{``label`` value: value} of ``promql`` (its first ``{`` opens the label
            matchers, to which this job's is added) at ``at``."""
            return values_by(
                prometheus.query(promql.replace("{", f'{{job="{MULTI_TURN_JOB}",', 1), at), label
            )

        check_env_series_against_stats(query, read_stats(out))
    finally:
        job.shutdown()

    for title, promql, result in results:
        assert result, f"panel {title!r}: {promql!r} returned no data"
        assert all(math.isfinite(float(s["value"][1])) for s in result), (title, result)
    # The panel's highlighted series: trajectories cut by the token budget, env timeouts.
    shown = {promql: values_by(result, "") for _, promql, result in results}
    (finish,) = [p for p in load_dashboard()["panels"] if p["title"].startswith("Trajectories")]
    for target in finish["targets"][1:]:
        assert shown[target["expr"]][""] > 0, target["legendFormat"]
    assert not file_sd_path(MULTI_TURN_JOB, prometheus.sd_dir).exists()


def check_env_series_against_stats(
    query: Callable[..., dict[str, float]], stats: list[dict[str, Any]]
) -> None:
    """The driver's env series (``query``: the job's series by a label) = stats.jsonl's
    ``env/*`` keys summed over the iterations; the job cut and timed out some trajectories."""
    assert len(stats) == MULTI_TURN_ITERATIONS
    trajectories = MULTI_TURN_ITERATIONS * MULTI_TURN_BATCH

    def total(key: str) -> float:
        return sum(line[key] for line in stats)

    assert query("rlfleet_job_env_turns_count{}") == {"": trajectories}
    turns = sum(line["env/turns_mean"] * MULTI_TURN_BATCH for line in stats)
    assert query("rlfleet_job_env_turns_sum{}") == {"": pytest.approx(turns)}
    assert query("rlfleet_job_env_step_seconds_count{}")[""] >= trajectories  # a reset each
    calls, errors = total(f"env/tool_calls/{TOOL}"), total(f"env/tool_errors/{TOOL}")
    assert calls > errors > 0
    assert query("rlfleet_job_env_tool_calls_total{}", "tool") == {TOOL: calls}
    assert query("rlfleet_job_env_tool_errors_total{}", "tool") == {TOOL: errors}
    finished = {reason: total(f"env/finished_{reason}") for reason in FINISH_REASONS}
    assert query("rlfleet_job_env_trajectories_total{}", "finish_reason") == finished
    assert sum(finished.values()) == trajectories
    assert finished["length"] > 0 and finished["env_timeout"] > 0
    events = {event: total(f"env/{event}") for event in COUNTED}
    assert query("rlfleet_job_env_events_total{}", "event") == events
    assert events["malformed_tool_calls"] > 0 and events["truncated_observations"] > 0
    assert query("rlfleet_job_env_masked_token_fraction{}") == {
        "": pytest.approx(stats[-1]["env/masked_token_fraction"])
    }
    assert 0 < stats[-1]["env/masked_token_fraction"] < 1


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
