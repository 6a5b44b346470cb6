"""Shared fixtures: real servers on loopback (moto's S3 server, a 2-node Ray cluster)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def find_shared(repo: Path = REPO) -> Path:
    """The lab's shared folder (reference data, KubeRay's CRDs): $LABTRAIN_SHARED_DIR, else a folder named
    ``shared`` beside the checkout or beside one of its parents (a CI checkout may sit one level deeper)."""
    if os.environ.get("LABTRAIN_SHARED_DIR"):
        return Path(os.environ["LABTRAIN_SHARED_DIR"])
    for parent in repo.parents:
        if (parent / "shared" / "DESIGN.md").is_file():
            return parent / "shared"
    return repo.parent / "shared"


SHARED = find_shared()

# Ray workers started by the test cluster import tests.* and jobs.* from this checkout.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1, with the standard AWS variables pointing at it."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    wait_http(endpoint)
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    yield endpoint
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def s3_bucket(s3_server):
    """A fresh bucket; returns (bucket name, S3Config for it)."""
    import boto3

    from labtrain.config import S3Config

    name = f"test-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=name)
    return name, S3Config(endpoint_url=s3_server)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory, s3_server):
    """The embedded local cluster (2 Ray nodes, exporters, the queue service) on free ports; this process connects to it."""
    import ray

    from labtrain import cluster

    root = tmp_path_factory.mktemp("ray")
    os.environ["LABTRAIN_STORAGE_ROOT"] = str(root / "storage")
    spec = cluster.ClusterSpec(state_dir=str(root / "cluster"), gcs_port=free_port(), dashboard_port=free_port(), metrics_base_port=free_port(), queue_port=free_port())
    state = cluster.up(spec)
    ray.init(address=state.address, log_to_driver=True)
    yield state
    ray.shutdown()
    stopped = cluster.down(spec.state_dir)
    assert len(stopped) == len(state.pids)
    assert not any(cluster._group_alive(pid) for pid in state.pids), "cluster down left processes running"


def ray_job_submit(cluster_state, args: list[str], *, timeout_s: float = 600) -> subprocess.CompletedProcess:
    """``ray job submit --working-dir . -- <args>`` against the test cluster, as a lab member would type it.
    A job agent that answers slowly on a busy machine is refused as "No available agent": tried again a few times."""
    ray = Path(sys.executable).with_name("ray")
    env = {**os.environ, "RAY_ADDRESS": cluster_state.dashboard_url}
    for _ in range(5):
        proc = subprocess.run([str(ray), "job", "submit", "--working-dir", ".", "--", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout_s)
        if "No available agent to submit job" not in proc.stdout + proc.stderr:
            break
        time.sleep(5)
    return proc
