"""Every job is a plain Ray job: `ray job submit --working-dir . -- python -m jobs.<name> --config F`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def submit_cluster(tmp_path_factory, ray_cluster):
    """A local cluster of its own: after a submitted Ray job ends, a later Ray Train run from the test
    process on the same cluster was seen to never start its workers (Ray Train V2), so the submitted job
    does not share the session's cluster."""
    from labtrain import cluster

    del ray_cluster  # started first: it sets LABTRAIN_STORAGE_ROOT, which this cluster's nodes inherit
    root = tmp_path_factory.mktemp("submit")
    spec = cluster.ClusterSpec(state_dir=str(root / "cluster"), gcs_port=free_port(), dashboard_port=free_port(), metrics_base_port=free_port())
    state = cluster.up(spec)
    yield state
    cluster.down(spec.state_dir)


def test_ray_job_submit_runs_the_shapes_job_to_the_end(submit_cluster):
    ray = Path(sys.executable).with_name("ray")
    env = {**os.environ, "RAY_ADDRESS": submit_cluster.dashboard_url}
    command = [str(ray), "job", "submit", "--working-dir", ".", "--", "python", "-m", "jobs.shapes", "--config", "jobs/shapes/configs/demo.yaml",
               "run.name=submitted", "epochs=1", "synthetic.num_samples=1024", "data.urls=submit/data/shard-{000000..000001}.tar"]
    for _ in range(10):  # a fresh head's job agent can take a few seconds to register
        proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent to submit job" not in proc.stderr + proc.stdout:
            break
        time.sleep(3)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "succeeded" in out
    accuracy = float(out.split("held-out accuracy ")[1].split()[0])
    assert accuracy > 0.4, "the job trained (chance is 0.25)"
    storage = Path(os.environ["LABTRAIN_STORAGE_ROOT"])
    assert (storage / "submit/data/index.json").exists()
    assert any((storage / "shapes/checkpoints/submitted").glob("checkpoint_*"))
