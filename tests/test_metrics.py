"""Metrics: names and units as in DESIGN.md, one exporter per node serving every process, promtool-clean."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import urllib.request
import uuid

import pytest

from labtrain.config import DataConfig, RunConfig
from labtrain.data import write_shards
from labtrain.train import run
from tests.data.conftest import make_samples
from tests.train.helpers import ProbeConfig, probe_train


def promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make tools` installs Debian's prometheus package"
    proc = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return response.read().decode()


def total(text: str, name: str, job: str) -> float:
    pattern = re.compile(rf'^{name}\{{[^}}]*job="{re.escape(job)}"[^}}]*\}} (\S+)$', re.M)
    return sum(float(v) for v in pattern.findall(text))


def test_processes_of_a_node_are_served_by_one_exporter(tmp_path):
    """Two separate processes write; one exporter serves both, and promtool accepts the output."""
    from tests.conftest import free_port

    metrics_dir = tmp_path / "m"
    code = textwrap.dedent(
        """
        import os, sys
        from labtrain.metrics import TrainMetrics
        m = TrainMetrics(job="j", kind="probe", rank=int(sys.argv[1]))
        m.batch(num_samples=8, step_s=0.02, data_wait_s=0.001)
        m.set_loss(1.5)
        m.set_lr(0.1)
        m.skipped(shards=1, samples=3)
        with m.time_checkpoint():
            pass
        m.gauge("labtrain_probe_conflict_ratio", "Share of conflicting samples.", 0.25)
        """
    )
    env = {"LABTRAIN_METRICS_DIR": str(metrics_dir), "PATH": "/usr/bin:/bin"}
    for rank in (0, 1):
        subprocess.run([sys.executable, "-c", code, str(rank)], check=True, env=env, timeout=60)
    port = free_port()
    exporter = subprocess.Popen([sys.executable, "-m", "labtrain.cli", "metrics", "serve", "--port", str(port), "--addr", "127.0.0.1", "--dir", str(metrics_dir)])
    try:
        from tests.conftest import wait_http

        wait_http(f"http://127.0.0.1:{port}/metrics")
        text = scrape(port)
    finally:
        exporter.terminate()
        exporter.wait(10)
    assert total(text, "labtrain_train_samples_total", "j") == 16
    assert 'labtrain_train_step_seconds_count{job="j",kind="probe",rank="1"} 1.0' in text
    assert total(text, "labtrain_data_skipped_shards_total", "j") == 2
    assert 'labtrain_probe_conflict_ratio{job="j",kind="probe",rank="0"} 0.25' in text
    promtool_check(text)


@pytest.mark.slow
def test_metrics_move_during_a_real_run_on_the_local_cluster(ray_cluster, tmp_path):
    shards = write_shards(make_samples(256), str(tmp_path / "shards"), max_samples=32, progress=False)
    name = f"metrics-{uuid.uuid4().hex[:6]}"
    cfg = ProbeConfig(
        data=DataConfig(urls=shards, batch_size=8),
        run=RunConfig(name=name, num_workers=2, storage_path=str(tmp_path / "ckpt")),
        epochs=1, checkpoint_every=8, step_sleep_s=0.3,
    )
    outcome = {}
    thread = threading.Thread(target=lambda: outcome.update(result=run(probe_train, cfg, cfg.run, kind="probe")))
    thread.start()
    seen: list[float] = []
    deadline = time.monotonic() + 300
    while thread.is_alive() and time.monotonic() < deadline:
        text = "".join(scrape(port) for port in ray_cluster.metrics_ports)  # both nodes' exporters
        seen.append(total(text, "labtrain_train_samples_total", name))
        time.sleep(1)
    thread.join()
    assert outcome["result"].error is None
    text = "".join(scrape(port) for port in ray_cluster.metrics_ports)
    assert total(text, "labtrain_train_samples_total", name) == 256
    assert total(text, "labtrain_train_steps_total", name) == 32
    assert total(text, "labtrain_train_data_wait_seconds_count", name) == 32
    assert total(text, "labtrain_checkpoint_seconds_count", name) == 2 * 3  # steps 8 and 16, and the final one
    moving = sorted(set(v for v in seen if 0 < v < 256))
    assert len(moving) >= 2, f"the counter did not move during the run: {seen}"
    for port in ray_cluster.metrics_ports:
        promtool_check(scrape(port))
