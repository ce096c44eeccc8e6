"""The shipped alert rules (deploy/prometheus/rules/), run by ``promtool test rules``: a job's
target that stops answering (a dead actor, or a killed driver's leftover discovery file) alerts
after a minute; Ray's own targets and answering ones do not."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

RULES = Path(__file__).resolve().parents[2] / "deploy" / "prometheus" / "rules"

DOWN = {"job": "demo", "role": "generator", "index": "0", "instance": "127.0.0.1:9"}
UP = {"job": "demo", "role": "learner", "index": "0", "instance": "127.0.0.1:8"}
RAY = {"job": "ray", "instance": "127.0.0.1:7"}


def series(labels: dict[str, str], values: str) -> dict[str, str]:
    selector = ",".join(f'{name}="{value}"' for name, value in labels.items())
    return {"series": f"up{{{selector}}}", "values": values}


def test_a_target_that_stops_answering_alerts_after_a_minute(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool comes with the prometheus package: apt-get install prometheus"
    alert = {
        "exp_labels": {**DOWN, "severity": "warning"},
        "exp_annotations": {
            "summary": "rlfleet job demo: generator 0 at 127.0.0.1:9 has not answered for 1 minute",
            "description": "Its actor died or its driver was killed. If the job is gone, delete "
            "/tmp/rlfleet/prometheus/demo.json (any rlfleet job started on that host deletes "
            "it too).",
        },
    }
    tests = {
        "rule_files": [str(path) for path in sorted(RULES.glob("*.yml"))],
        "evaluation_interval": "15s",
        "tests": [
            {
                "interval": "15s",
                "input_series": [
                    series(DOWN, "1 1 0x8"),
                    series(UP, "1x10"),
                    series(RAY, "0x10"),
                ],
                "alert_rule_test": [
                    {"eval_time": "1m", "alertname": "RlfleetTargetDown", "exp_alerts": []},
                    {"eval_time": "2m", "alertname": "RlfleetTargetDown", "exp_alerts": [alert]},
                ],
            }
        ],
    }
    path = tmp_path / "alerts_test.yml"
    path.write_text(yaml.safe_dump(tests))
    checked = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr
