"""common/metrics.py: a metric set records in its own registry, serves it over HTTP, and the
file_sd file lists each process's endpoint with its labels."""

from __future__ import annotations

import json
import socket
import stat
import subprocess
import urllib.request

import pytest
import ray
from prometheus_client.parser import text_string_to_metric_families

from rlfleet.common.config import MetricsConfig
from rlfleet.common.metrics import (
    DEFAULT_FILE_SD_DIR,
    OWNER_LABEL,
    MetricSet,
    MetricsTarget,
    check_non_negative,
    file_sd_owners,
    file_sd_path,
    remove_orphaned_file_sd,
    remove_own_file_sd,
    write_file_sd,
)
from rlfleet.common.processes import owner_tag


class ExampleMetrics(MetricSet):
    """A role's metric set as the roles write theirs (``actors/metrics.py`` and the others)."""

    role = "example"

    def __init__(self, job: str, index: int = 0) -> None:
        super().__init__(job, index)
        self._events = self._counter("rlfleet_example_events_total", "Events counted.")

    def record_events(self, count: int) -> None:
        check_non_negative("count", count)
        self._events.inc(count)


def test_a_set_labels_its_series_with_job_role_index_and_checks_values() -> None:
    metrics = ExampleMetrics("demo", 2)
    metrics.record_events(3)
    labels = {"job": "demo", "role": "example", "index": "2"}
    assert metrics.labels == labels
    assert metrics.registry.get_sample_value("rlfleet_example_events_total", labels) == 3
    with pytest.raises(ValueError, match="count must be a non-negative number, got -1"):
        metrics.record_events(-1)
    with pytest.raises(ValueError, match="index must be >= 0"):
        ExampleMetrics("demo", -1)
    with pytest.raises(ValueError, match="job must be a non-empty name"):
        ExampleMetrics("")


def test_served_endpoint_exposes_the_registry_and_closes() -> None:
    metrics = ExampleMetrics("demo", 4)
    metrics.record_events(5)
    target = metrics.serve()
    try:
        assert (target.host, target.job, target.role, target.index) == (
            "127.0.0.1",
            "demo",
            "example",
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
    assert exposed["rlfleet_example_events_total"] == 5
    with pytest.raises(RuntimeError, match="not served"):
        _ = metrics.target
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{target.address}/metrics", timeout=5)


def test_wildcard_bind_advertises_the_node_address() -> None:
    metrics = ExampleMetrics("demo")
    target = metrics.serve(host="0.0.0.0")
    try:
        assert target.host == ray.util.get_node_ip_address()
        with urllib.request.urlopen(f"http://{target.address}/metrics", timeout=5) as response:
            assert b"rlfleet_example_events_total" in response.read()
    finally:
        metrics.close()


def test_from_config_serves_only_when_enabled() -> None:
    served = ExampleMetrics.from_config("demo", 3, MetricsConfig())
    try:
        assert (served.target.host, served.target.index) == ("127.0.0.1", 3)
        assert served.served_target == served.target
    finally:
        served.close()
    assert served.served_target is None
    unserved = ExampleMetrics.from_config("demo", 3, MetricsConfig(enabled=False))
    unserved.record_events(1)
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


def dead_pid() -> int:
    """The pid of a process that has exited."""
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_the_files_of_drivers_that_are_gone_are_removed_and_no_others(tmp_path) -> None:
    """A killed driver could not remove its file: the next job on the host does. Files of a
    live driver, of another host, without an owner or unreadable stay."""
    here = socket.gethostname()
    target = [MetricsTarget("h", 1, "demo", "job", 0)]
    killed = write_file_sd(tmp_path / "killed.json", target, owner=f"{here}:{dead_pid()}")
    live = write_file_sd(tmp_path / "live.json", target, owner=owner_tag())
    remote = write_file_sd(tmp_path / "remote.json", target, owner=f"other-host:{dead_pid()}")
    unowned = write_file_sd(tmp_path / "unowned.json", target)
    (tmp_path / "broken.json").write_text("[{")

    assert json.loads(live.read_text())[0]["labels"][OWNER_LABEL] == owner_tag()
    assert remove_orphaned_file_sd(tmp_path) == [killed]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "broken.json",
        "live.json",
        remote.name,
        unowned.name,
    ]


def test_a_job_removes_its_file_but_not_one_another_job_of_its_name_wrote_since(tmp_path) -> None:
    target = [MetricsTarget("h", 1, "demo", "job", 0)]
    path = write_file_sd(tmp_path / "demo.json", target, owner="host:1")
    remove_own_file_sd(path, "host:1")
    assert not path.exists()

    write_file_sd(path, target, owner="host:2")  # a second job named demo, started meanwhile
    remove_own_file_sd(path, "host:1")
    assert file_sd_owners(path) == {"host:2"}
