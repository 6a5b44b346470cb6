"""Every job is a plain Ray job: `ray job submit --working-dir . -- python -m jobs.<name> --config F`.

A Ray Train run started from the test process after a submitted job had ended on the same cluster was once
seen to never start its workers (Ray 2.60, Train V2); labtrain.train.run's start watchdog now restarts such a
controller, and this file still sorts after the other Ray Train tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import ray_job_submit

pytestmark = pytest.mark.slow


def test_ray_job_submit_runs_the_shapes_job_to_the_end(ray_cluster):
    proc = ray_job_submit(ray_cluster, ["python", "-m", "jobs.shapes", "--config", "jobs/shapes/configs/demo.yaml", "run.name=submitted",
                                        "epochs=1", "synthetic.num_samples=1024", "data.urls=submit/data/shard-{000000..000001}.tar"])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "succeeded" in out
    accuracy = float(out.split("held-out accuracy ")[1].split()[0])
    assert accuracy > 0.4, "the job trained (chance is 0.25)"
    storage = Path(os.environ["LABTRAIN_STORAGE_ROOT"])
    assert (storage / "submit/data/index.json").exists()
    assert any((storage / "shapes/checkpoints/submitted").glob("checkpoint_*"))
