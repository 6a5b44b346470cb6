"""Every job is a plain Ray job (`ray job submit --working-dir . -- python -m jobs.<name> --config F`: the GAN
job's kill-a-worker tests in tests/jobs/gan/test_job.py submit that way), and the lab queue dispatches them so.

A Ray Train run started from the test process after a submitted job had ended on the same cluster was once
seen to never start its workers (Ray 2.60, Train V2); labtrain.train.run's start watchdog now restarts such a
controller, and this file still sorts after the other Ray Train tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_labtrain_submit_goes_through_the_local_clusters_queue(ray_cluster, tmp_path):
    """The embedded default: `labtrain cluster up` starts the queue beside Ray and writes its address and a
    token where `labtrain submit` finds them; the job is admitted, dispatched as a Ray job whose submission
    id is the queue's job id, and followed to the end."""
    import subprocess
    import sys

    from ray.job_submission import JobSubmissionClient

    from labtrain import cluster

    client_file = Path(ray_cluster.spec.state_dir) / cluster.QUEUE_CLIENT_FILE
    assert client_file.stat().st_mode & 0o077 == 0, "the token file is private"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABTRAIN_QUEUE", "LABTRAIN_TOKEN"))}
    env |= {"LABTRAIN_CLUSTER_DIR": ray_cluster.spec.state_dir, "HOME": str(tmp_path)}  # no ~/.config/labtrain/queue.yaml
    labtrain = [sys.executable, "-m", "labtrain.cli"]
    proc = subprocess.run([*labtrain, "submit", "jobs/shapes/configs/demo.yaml", "--job", "jobs.shapes", "--workers", "2", "--follow", "run.name=queued",
                           "epochs=1", "synthetic.write=true", "synthetic.num_samples=1024", "data.urls=queued/data/shard-{000000..000001}.tar"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    job_id = proc.stdout.splitlines()[0].strip()
    assert f"{job_id}: WAITING" in proc.stderr or f"{job_id}: DISPATCHING" in proc.stderr or f"{job_id}: RUNNING" in proc.stderr
    assert f"{job_id}: SUCCEEDED" in proc.stderr
    assert float(proc.stdout.split("held-out accuracy ")[1].split()[0]) > 0.4
    assert JobSubmissionClient(ray_cluster.dashboard_url).get_job_status(job_id).value == "SUCCEEDED"
    assert any((Path(os.environ["LABTRAIN_STORAGE_ROOT"]) / "shapes/checkpoints/queued").glob("checkpoint_*"))
    table = subprocess.run([*labtrain, "queue", "--all-states"], env=env, capture_output=True, text=True, timeout=60)
    assert table.returncode == 0 and job_id in table.stdout, table.stdout + table.stderr


def _submit_follow(ray_cluster, tmp_path, argv: list[str]) -> tuple[str, str]:
    """`labtrain submit ... --follow` against the local cluster's queue; (the job id, its output)."""
    import subprocess
    import sys

    from labtrain import cluster

    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABTRAIN_QUEUE", "LABTRAIN_TOKEN"))}
    env |= {"LABTRAIN_CLUSTER_DIR": ray_cluster.spec.state_dir, "HOME": str(tmp_path)}
    assert (Path(ray_cluster.spec.state_dir) / cluster.QUEUE_CLIENT_FILE).exists()
    proc = subprocess.run([sys.executable, "-m", "labtrain.cli", "submit", *argv, "--follow"], env=env, capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    job_id = proc.stdout.splitlines()[0].strip()
    assert f"{job_id}: SUCCEEDED" in proc.stderr
    return job_id, out


def test_a_nas_search_goes_through_the_queue_with_its_gang_as_trials(ray_cluster, tmp_path):
    """The job contract: the queue's gang reaches NAS as concurrent trials and resources per trial, not as a
    run section NAS does not have (it used to die on `run: unknown key`)."""
    import json

    from tests.jobs.nas.conftest import NB201_TABLE

    job_id, out = _submit_follow(ray_cluster, tmp_path, [
        "jobs/nas/configs/nb201_table.yaml", "--job", "jobs.nas", "--workers", "2", "--cpus-per-worker", "0.5",
        f"evaluator.path={NB201_TABLE}", "search.methods=[weaknas]", "search.budget=20", "search.weaknas.predictor.hidden_sizes=[32]",
    ])
    assert "weaknas: 20 done, 0 failed" in out
    history = json.loads((Path(os.environ["LABTRAIN_STORAGE_ROOT"]) / "nas" / job_id / "history.json").read_text())
    assert history["name"] == job_id  # --name: the search is named by the queue, so a rerun continues it
    from ray.job_submission import JobSubmissionClient

    entrypoint = JobSubmissionClient(ray_cluster.dashboard_url).get_job_info(job_id).entrypoint
    assert "--workers 2 --cpus-per-worker 0.5" in entrypoint and "run." not in entrypoint


def test_vatt_goes_through_the_queue(ray_cluster, tmp_path):
    from tests.jobs.vatt.test_job import SMALL

    small = [o for o in SMALL if not o.startswith(("checkpoint_every", "log_every"))]
    _, out = _submit_follow(ray_cluster, tmp_path, [
        "jobs/vatt/configs/tiny.yaml", "--job", "jobs.vatt", "--workers", "2", *small,
        "data.urls=queued-vatt/train/shard-{000000..000003}.tar", "eval.urls=queued-vatt/eval/shard-{000000..000001}.tar",
    ])
    assert "evaluation: text-to-video group R@1" in out and "step 4/4 (100%)" in out


def test_cluster_up_restarts_a_dead_queue_and_records_it(ray_cluster, tmp_path):
    """The queue service dies (SIGKILL); `labtrain cluster up` on the running cluster restarts only the queue,
    recorded in the state file so `down` stops it, and the CLI works against it (its new token)."""
    import signal
    import subprocess
    import sys
    import urllib.request

    from labtrain import cluster

    state_dir = ray_cluster.spec.state_dir
    before = cluster.load_state(state_dir)
    os.killpg(before.queue_pid, signal.SIGKILL)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LABTRAIN_QUEUE", "LABTRAIN_TOKEN"))} | {"HOME": str(tmp_path)}
    spec = ray_cluster.spec
    up = subprocess.run([sys.executable, "-m", "labtrain.cli", "cluster", "up", "--state-dir", state_dir, "--port", str(spec.gcs_port),
                         "--dashboard-port", str(spec.dashboard_port), "--queue-port", str(spec.queue_port)], env=env, capture_output=True, text=True, timeout=300)
    assert up.returncode == 0 and "restarted it" in up.stderr, up.stdout + up.stderr
    after = cluster.load_state(state_dir)
    assert after.queue_pid != before.queue_pid and after.queue_pid in after.pids and before.queue_pid not in after.pids
    assert set(after.pids) - {after.queue_pid} == set(before.pids) - {before.queue_pid}  # Ray and the exporters untouched
    with urllib.request.urlopen(f"{after.queue_url}/healthz", timeout=10):
        pass
    listed = subprocess.run([sys.executable, "-m", "labtrain.cli", "queue"], env=env | {"LABTRAIN_CLUSTER_DIR": state_dir}, capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    again = subprocess.run([sys.executable, "-m", "labtrain.cli", "cluster", "up", "--state-dir", state_dir], env=env, capture_output=True, text=True, timeout=60)
    assert again.returncode == 1 and "already running" in again.stderr and "Traceback" not in again.stderr
