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
