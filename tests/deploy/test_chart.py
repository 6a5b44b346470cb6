"""helm lint, and every manifest rendered for the default values and each ci/*-values.yaml validated offline:
core kinds against Kubernetes' schemas (kubernetes-validate, strict), the RayCluster against KubeRay's CRD,
the monitors against the monitoring.coreos.com subset in conftest."""

from __future__ import annotations

import copy

import jsonschema
import kubernetes_validate
import pytest
from kubernetes_validate.utils import latest_version

from tests.deploy.conftest import CHART, CI_VALUES, MONITOR_SCHEMAS, crd_schema, render, run_helm

K8S_VERSION = latest_version()
VALUES = [None, *CI_VALUES]
IDS = ["default", *[p.name.removesuffix("-values.yaml") for p in CI_VALUES]]


def validate(doc: dict) -> None:
    kind = doc["kind"]
    if kind == "RayCluster":
        jsonschema.validate(doc, crd_schema("ray.io_rayclusters.yaml"))
        # The CRD's pod templates are also checked against Kubernetes' own PodTemplateSpec (strict).
        spec = doc["spec"]
        for template in [spec["headGroupSpec"]["template"], *[g["template"] for g in spec.get("workerGroupSpecs", [])]]:
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}, K8S_VERSION, strict=True)
    elif kind in MONITOR_SCHEMAS:
        jsonschema.validate(doc, MONITOR_SCHEMAS[kind])
    else:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_ci_values_cover_each_option():
    names = {p.name for p in CI_VALUES}
    assert {"gpu-groups-values.yaml", "autoscaling-values.yaml", "postgresql-values.yaml", "monitoring-values.yaml",
            "monitoring-off-values.yaml", "network-policy-values.yaml", "rdma-values.yaml"} <= names


@pytest.mark.parametrize("values", VALUES, ids=IDS)
def test_helm_lint(helm, values):
    args = ["lint", "--strict", str(CHART)] + (["-f", str(values)] if values else [])
    result = run_helm(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize("values", VALUES, ids=IDS)
def test_every_manifest_validates(helm, values):
    docs = render(*([values] if values else []))
    assert {"RayCluster", "Pod"} <= {d["kind"] for d in docs}
    for doc in docs:
        try:
            validate(doc)
        except (jsonschema.ValidationError, kubernetes_validate.ValidationError) as error:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']} ({IDS[VALUES.index(values)]}): {error}")


def test_validators_reject_what_the_api_server_would(helm):
    """The checks above can fail: an unknown field or a wrong type is caught in each kind of schema."""
    docs = render(CHART / "ci" / "monitoring-values.yaml")
    by_kind = {d["kind"]: d for d in docs}
    broken = copy.deepcopy(by_kind["RayCluster"])
    broken["spec"]["workerGroupSpecs"][0]["replica"] = 2
    with pytest.raises(jsonschema.ValidationError, match="replica"):
        validate(broken)
    broken = copy.deepcopy(by_kind["RayCluster"])
    broken["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["imagePullPolicy"] = 3
    with pytest.raises((jsonschema.ValidationError, kubernetes_validate.ValidationError)):
        validate(broken)
    broken = copy.deepcopy(by_kind["Deployment"])
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["paht"] = "/healthz"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(broken)
    for kind in ("PodMonitor", "ServiceMonitor"):
        broken = copy.deepcopy(by_kind[kind])
        broken["spec"]["selector"]["matchLabel"] = {}
        with pytest.raises(jsonschema.ValidationError):
            validate(broken)
