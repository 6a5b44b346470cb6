"""A live queue service (uvicorn subprocess on a free loopback port) and helpers to drive it."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import REPO, free_port, wait_http

ADMIN_TOKEN = "admin-token-0123456789abcdef"
TOKENS = {name: f"{name}-token-0123456789abcdef" for name in ("alice", "bob", "carol", "dave")}
TEST_JOBS = r"^(jobs|tests\.queue)\.[a-z_]+$"
SLEEP_CONFIG = str(Path(__file__).with_name("sleep.yaml"))


def _pg_bin() -> str | None:
    """Debian's server binaries (/usr/lib/postgresql/<major>/bin), the newest major installed."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return os.path.dirname(found[-1]) if found else None


@pytest.fixture(scope="module")
def postgres_url():
    pg_bin = _pg_bin()
    if pg_bin is None:
        pytest.fail("PostgreSQL's server is not installed under /usr/lib/postgresql (run `make tools`, or apt-get install postgresql)")
    data = tempfile.mkdtemp(prefix="labtrain-pg-", dir="/tmp")
    as_pg = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(data, "postgres", "postgres")
        as_pg = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run([*as_pg, f"{pg_bin}/initdb", "-D", f"{data}/db", "-A", "trust", "-U", "postgres"], check=True, capture_output=True)
    subprocess.run([*as_pg, f"{pg_bin}/pg_ctl", "-D", f"{data}/db", "-l", f"{data}/log", "-w", "-o", f"-p {port} -k {data} -h 127.0.0.1", "start"], check=True, capture_output=True)
    yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    subprocess.run([*as_pg, f"{pg_bin}/pg_ctl", "-D", f"{data}/db", "-m", "immediate", "stop"], capture_output=True)
    shutil.rmtree(data, ignore_errors=True)


class QueueServer:
    """One service process; ``kill()`` is SIGKILL, ``start()`` starts it again on the same DB and port."""

    def __init__(self, tmp: Path, ray_address: str | None, users: list[dict], extra_args: list[str] = (), db: str | None = None):
        self.tmp, self.port = tmp, free_port()
        tmp.mkdir(parents=True, exist_ok=True)
        self.url = f"http://127.0.0.1:{self.port}"
        users_file = tmp / "users.yaml"
        users_file.write_text(yaml.safe_dump(users))
        self.env = {**os.environ, "LABTRAIN_QUEUE_DB": db or str(tmp / "queue.db"), "LABTRAIN_QUEUE_ADMIN_TOKEN": ADMIN_TOKEN,
                    "LABTRAIN_QUEUE_USERS_FILE": str(users_file), "LABTRAIN_QUEUE_JOB_PATTERN": TEST_JOBS, "LABTRAIN_QUEUE_CYCLE_S": "0.2"}
        self.env.pop("LABTRAIN_QUEUE_RAY_ADDRESS", None)
        if ray_address:
            self.env["LABTRAIN_QUEUE_RAY_ADDRESS"] = ray_address
        self.args = [sys.executable, "-m", "labtrain.queue", "serve", "--port", str(self.port), "--log-level", "warning", *extra_args]
        self.proc = None
        self.marker_dir = tmp / "markers"
        self.marker_dir.mkdir(exist_ok=True)
        self.storage = tmp / "storage"

    def start(self) -> "QueueServer":
        self.log = open(self.tmp / "server.log", "ab")
        self.proc = subprocess.Popen(self.args, cwd=REPO, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        wait_http(self.url + "/healthz", timeout_s=60)
        return self

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.kill()

    def client(self, user: str) -> httpx.Client:
        token = ADMIN_TOKEN if user == "admin" else TOKENS[user]
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=30)

    def sleep_spec(self, name: str, *, steps: int = 2, step_s: float = 0.2, workers: int = 1, cpus: float = 1.0, **fields) -> dict:
        """A spec of the tiny checkpointing job; ``name`` is its run.name and marker file."""
        overrides = [f"marker_dir={self.marker_dir}", f"run.storage_path={self.storage}", f"run.name={name}", f"steps={steps}", f"step_s={step_s}"]
        return {"job": "tests.queue.sleepjob", "config": SLEEP_CONFIG, "overrides": overrides,
                "resources": {"workers": workers, "cpus_per_worker": cpus}, **fields}

    def marker(self, name: str) -> list[str]:
        path = self.marker_dir / f"{name}.log"
        return path.read_text().splitlines() if path.exists() else []


def users_list(**quotas) -> list[dict]:
    out = []
    for name, token in TOKENS.items():
        out.append({"name": name, "group": "vision" if name in ("alice", "bob") else "nlp", "share": 1.0, "token": token, "quotas": quotas.get(name, {})})
    return out


@pytest.fixture
def make_server(tmp_path):
    servers = []

    def make(ray_address: str | None = None, *, users: list[dict] | None = None, extra_args: list[str] = (), db: str | None = None) -> QueueServer:
        server = QueueServer(tmp_path / f"q{len(servers)}", ray_address, users or users_list(), list(extra_args), db)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()


def wait_for(predicate, timeout_s: float = 60, interval_s: float = 0.2, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(interval_s)


def job_state(client: httpx.Client, job_id: str) -> dict:
    r = client.get(f"/api/v1/jobs/{job_id}")
    r.raise_for_status()
    return r.json()


def wait_states(client: httpx.Client, ids: list[str], states=("SUCCEEDED",), timeout_s: float = 120) -> dict[str, dict]:
    terminal = ("SUCCEEDED", "FAILED", "CANCELLED", "TIMEOUT")

    def done():
        jobs = {i: job_state(client, i) for i in ids}
        return jobs if all(j["state"] in terminal for j in jobs.values()) else None

    jobs = wait_for(done, timeout_s, what=f"jobs {ids} to end")
    for job in jobs.values():
        assert job["state"] in states, f"{job['id']} ended {job['state']}: {job['message']}"
    return jobs
