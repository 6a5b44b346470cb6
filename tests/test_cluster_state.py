"""``labtrain cluster down`` stops what ``up`` started and nothing else (no Ray here: a stand-in process)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from labtrain import cluster


def test_down_leaves_a_process_that_reuses_a_recorded_pid_alone(tmp_path):
    proc = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        state_dir = str(tmp_path)
        cluster._save_state(cluster.ClusterState(spec=cluster.ClusterSpec(state_dir=state_dir), pids=[proc.pid]))
        state_file = Path(state_dir, "cluster.json")
        raw = json.loads(state_file.read_text())
        assert set(raw["start_times"]) == {str(proc.pid)}
        raw["start_times"][str(proc.pid)] -= 100  # as if `up` had started another process with this pid
        state_file.write_text(json.dumps(raw))
        assert cluster.down(state_dir) == [] and proc.poll() is None

        cluster._save_state(cluster.ClusterState(spec=cluster.ClusterSpec(state_dir=state_dir), pids=[proc.pid]))
        assert cluster.down(state_dir) == [proc.pid]
        assert proc.wait(10) is not None
    finally:
        proc.kill()


def test_down_also_stops_what_ran_below_in_a_session_of_its_own(tmp_path):
    """Ray starts a job's driver in its own session: stopping the node's process group alone left it behind."""
    import os
    import sys

    code = "import subprocess, time; p = subprocess.Popen(['sleep', '300'], start_new_session=True); print(p.pid, flush=True); time.sleep(300)"
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True)
    driver = int(parent.stdout.readline())
    try:
        assert os.getpgid(driver) != parent.pid  # not in the group `down` kills
        cluster._save_state(cluster.ClusterState(spec=cluster.ClusterSpec(state_dir=str(tmp_path)), pids=[parent.pid]))
        assert cluster.down(str(tmp_path)) == [parent.pid]
        assert parent.wait(10) is not None
        import psutil

        assert not psutil.pid_exists(driver) or psutil.Process(driver).status() == psutil.STATUS_ZOMBIE
    finally:
        parent.kill()
        subprocess.run(["kill", "-9", str(driver)], capture_output=True)


def test_up_refuses_a_taken_port_before_starting_anything(tmp_path):
    import socket

    import pytest

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with socket.socket() as probe:  # a GCS port that is free now, so the queue's is the one refused
            probe.bind(("127.0.0.1", 0))
            free = probe.getsockname()[1]
        spec = cluster.ClusterSpec(state_dir=str(tmp_path / "c"), queue_port=port, gcs_port=free)
        # Another process may take the free port meanwhile (CI saw one on port + 1): the queue's port is named either way.
        with pytest.raises(cluster.ClusterError, match=rf"\b{port} \(queue\) already taken"):
            cluster.up(spec)
    assert not (tmp_path / "c" / "cluster.json").exists()
