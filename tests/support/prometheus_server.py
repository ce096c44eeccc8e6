"""A real Prometheus server for tests, and the queries of the shipped Grafana dashboard.

The server runs the Debian package's ``prometheus`` binary (CI: ``apt-get install -y
--no-install-recommends prometheus``; ``PROMETHEUS_BIN`` may name another binary) on 127.0.0.1
with a free port and a private storage directory. Its config is the shipped
``deploy/prometheus/prometheus-local.yml`` with a 1 s scrape interval and the file_sd files
read from the server's own ``sd_dir``, so every test that scrapes through it also proves the
shipped scrape config. Tests register endpoints with ``rlfleet.common.metrics.write_file_sd(
server.sd_file(name), targets)``.

The fixture ``prometheus`` gives each test its own server, stopped at teardown.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Collection, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from support.ports import free_ports

REPO = Path(__file__).resolve().parents[2]
LOCAL_CONFIG = REPO / "deploy" / "prometheus" / "prometheus-local.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "rlfleet.json"
LABEL_VALUES = re.compile(r"label_values\((.+),\s*(\w+)\)")
INSTALL_HINT = "apt-get install -y --no-install-recommends prometheus"

Result = list[dict[str, Any]]


def prometheus_binary() -> str:
    binary = os.environ.get("PROMETHEUS_BIN") or shutil.which("prometheus")
    if not binary:
        raise RuntimeError(f"no prometheus binary on PATH (nor PROMETHEUS_BIN): {INSTALL_HINT}")
    return binary


def scrape_config_for_tests(sd_dir: Path, scrape_interval: str = "1s") -> dict[str, Any]:
    """The shipped local config, scraping every ``scrape_interval`` the targets in sd_dir."""
    config = yaml.safe_load(LOCAL_CONFIG.read_text())
    config["global"].update(scrape_interval=scrape_interval, evaluation_interval=scrape_interval)
    for scrape in config["scrape_configs"]:
        for discovery in scrape.get("file_sd_configs", []):
            discovery["files"] = [str(sd_dir / "*.json")]
            discovery["refresh_interval"] = scrape_interval
    return config


class PrometheusError(RuntimeError):
    pass


class PrometheusServer:
    def __init__(self, workdir: Path, scrape_interval: str = "1s") -> None:
        self.workdir = workdir
        self.sd_dir = workdir / "sd"
        self.config_path = workdir / "prometheus.yml"
        self.log_path = workdir / "prometheus.log"
        self.scrape_interval = scrape_interval
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def sd_file(self, name: str) -> Path:
        """Where to write a file_sd file that this server reads."""
        return self.sd_dir / f"{name}.json"

    def start(self, timeout: float = 30.0, attempts: int = 3) -> PrometheusServer:
        """Start and wait for /-/ready; a port taken between choosing and binding is retried."""
        self.sd_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            yaml.safe_dump(scrape_config_for_tests(self.sd_dir, self.scrape_interval))
        )
        for _ in range(attempts):
            (self.port,) = free_ports(1)
            self._process = self._launch()
            if self._wait_ready(timeout):
                return self
        raise PrometheusError(f"prometheus did not start; its log:\n{self.log_tail()}")

    def _launch(self) -> subprocess.Popen[bytes]:
        command = [
            prometheus_binary(),
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        with self.log_path.open("ab") as log:
            return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is None or self._process.poll() is not None:
                return False
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                    if response.status == 200:
                        return True
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.1)
        self.stop()
        return False

    def stop(self) -> None:
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def api(self, endpoint: str, **params: Any) -> Any:
        """GET /api/v1/<endpoint>; returns its ``data`` or raises with Prometheus' error."""
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        try:
            with urllib.request.urlopen(f"{self.url}/api/v1/{endpoint}?{query}", timeout=10) as r:
                body = json.load(r)
        except urllib.error.HTTPError as error:
            body = json.loads(error.read() or b"{}")
        if body.get("status") != "success":
            raise PrometheusError(f"{endpoint} {params}: {body.get('error', body)}")
        return body["data"]

    def query(self, promql: str, at: float | None = None) -> Result:
        """An instant query (at a unix time, default now): the result's series."""
        return self.api("query", query=promql, time=at)["result"]

    def query_range(self, promql: str, start: float, end: float, step: float = 1.0) -> Result:
        return self.api("query_range", query=promql, start=start, end=end, step=step)["result"]

    def wait_for(
        self,
        promql: str,
        timeout: float = 30.0,
        condition: Callable[[Result], bool] = bool,
    ) -> Result:
        """Poll ``promql`` until ``condition`` holds for its result (default: any series)."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(promql)
            if condition(result):
                return result
            if time.monotonic() > deadline:
                targets = self.api("targets")["activeTargets"]
                raise PrometheusError(
                    f"{promql!r} gave {result} after {timeout}s; targets: {targets}"
                )
            time.sleep(0.25)

    def job_targets(self, job: str) -> list[dict[str, Any]]:
        """The active targets labelled ``job``, as /api/v1/targets describes them."""
        return [
            target
            for target in self.api("targets", state="active")["activeTargets"]
            if target["labels"].get("job") == job
        ]

    def wait_for_targets(self, job: str, count: int, timeout: float = 30.0) -> list[dict]:
        """Wait until exactly ``count`` targets labelled ``job`` are discovered, all up."""
        deadline = time.monotonic() + timeout
        while True:
            targets = self.job_targets(job)
            if len(targets) == count and all(t["health"] == "up" for t in targets):
                return targets
            if time.monotonic() > deadline:
                raise PrometheusError(f"wanted {count} targets of job {job} up, got {targets}")
            time.sleep(0.25)

    def wait_for_scrapes_after(self, job: str, moment: float, timeout: float = 30.0) -> None:
        """Wait until every active target labelled ``job`` was scraped (successfully) by a
        scrape that started after the unix time ``moment``: Prometheus then holds every value
        the job's processes had recorded by then."""
        deadline = time.monotonic() + timeout
        while True:
            targets = self.job_targets(job)
            if targets and all(
                target["health"] == "up" and scraped_at(target) > moment for target in targets
            ):
                return
            if time.monotonic() > deadline:
                raise PrometheusError(f"targets of job {job} not scraped after {moment}: {targets}")
            time.sleep(0.25)


def scraped_at(target: dict[str, Any]) -> float:
    """A target's ``lastScrape`` (RFC 3339, nanoseconds) as a unix time."""
    return datetime.fromisoformat(target["lastScrape"]).timestamp()


def scrape(target: Any) -> dict[str, float]:
    """{sample name: value} read from a ``MetricsTarget``'s /metrics (histogram buckets left
    out, so each name is one sample in a process's single-series metric sets)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://{target.address}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if "le" not in sample.labels
    }


def values_by(result: Result, label: str) -> dict[str, float]:
    """{series' ``label`` value: sample value} of an instant-query result."""
    return {series["metric"].get(label, ""): float(series["value"][1]) for series in result}


@pytest.fixture
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    """A real Prometheus scraping the file_sd files written to ``prometheus.sd_dir``."""
    server = PrometheusServer(tmp_path_factory.mktemp("prometheus")).start()
    try:
        yield server
    finally:
        server.stop()


MULTI_TURN_ROW = "Agents / environments"
"""The dashboard row of multi-turn jobs' panels (turns, tools, environments): no data for a
single-turn job; tests/deploy/test_dashboard.py proves it after a multi-turn one."""


def dashboard_rows(path: Path = DASHBOARD) -> dict[str, list[str]]:
    """{row title: the titles of the panels under it} (panels above the first row: under "")."""
    rows: dict[str, list[str]] = {"": []}
    row = ""
    for panel in json.loads(path.read_text())["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
            rows[row] = [nested["title"] for nested in panel.get("panels", [])]
        else:
            rows[row].append(panel["title"])
    return rows


def dashboard_queries(
    path: Path = DASHBOARD, skip_rows: Collection[str] = ()
) -> list[tuple[str, str]]:
    """(title, PromQL) for every query of the Grafana dashboard: each panel target (but those of
    the panels under the rows ``skip_rows``), and each query variable's
    ``label_values(metric, label)`` as the PromQL ``group by (label) (metric)`` that returns data
    exactly when the variable has values."""
    dashboard = json.loads(path.read_text())
    skipped = {title for row in skip_rows for title in dashboard_rows(path)[row]}
    panels = [
        nested
        for panel in dashboard["panels"]
        for nested in [panel, *panel.get("panels", [])]
        if nested["title"] not in skipped
    ]
    queries = [
        (panel["title"], target["expr"]) for panel in panels for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            match = LABEL_VALUES.fullmatch(variable["query"]["query"])
            if match is None:
                raise ValueError(
                    f"variable ${variable['name']}: expected label_values(metric, label)"
                )
            metric, label = match.groups()
            queries.append((f"${variable['name']}", f"group by ({label}) ({metric})"))
    return queries


def expand_dashboard_variables(promql: str, job: str, rate_interval: str = "30s") -> str:
    """A dashboard query as Grafana sends it when ``job`` is selected."""
    expanded = promql.replace('=~"$job"', f'="{job}"').replace("$__rate_interval", rate_interval)
    if "$" in expanded:
        raise ValueError(f"unexpanded Grafana variable in {expanded!r}")
    return expanded
