"""Every job is a plain Ray job: `ray job submit --working-dir . -- python -m jobs.<name> --config F`.

This file runs last on the session cluster (tests/train/test_submit.py sorts after every other Ray test):
a Ray Train run started from the test process after a submitted job had ended on the same cluster was seen
to never start its workers (Ray 2.60, Train V2), and a fresh second cluster was not ready to take jobs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.slow


def test_ray_job_submit_runs_the_shapes_job_to_the_end(ray_cluster):
    ray = Path(sys.executable).with_name("ray")
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.dashboard_url}
    command = [str(ray), "job", "submit", "--working-dir", ".", "--", "python", "-m", "jobs.shapes", "--config", "jobs/shapes/configs/demo.yaml",
               "run.name=submitted", "epochs=1", "synthetic.num_samples=1024", "data.urls=submit/data/shard-{000000..000001}.tar"]
    for _ in range(40):  # a fresh head's job agent can take a while to register
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
