"""The lab queue's costs, measured in one run; the last line is one JSON object.

* ``schedule_cycle_ms``: one scheduling cycle (:func:`labtrain.queue.scheduler.plan`) over 10,000 waiting jobs
  from 100 users on a busy 512-CPU / 64-GPU cluster (median of 20), goal <= 20; ``store_cycle_ms`` adds reading
  that state from SQLite (the service's real cycle, Ray calls aside).
* ``submit_p99_ms`` / ``list_p99_ms``: a live service on loopback under a bounded load (4 client threads,
  800 submits from 4 users, then 800 lists of one user's 200 jobs), goal <= 50.
* ``list_p99_ms_10k_finished`` / ``history_p99_ms_10k_finished``: the same with 10,000 finished jobs in the store
  first (a lab's months): lists of one user's active jobs (as `labtrain queue` asks) and 800 history pages of 50,
  goal <= 50.
* ``queue_extra_start_s``: submit -> Ray RUNNING through the queue minus the same through a direct Job
  Submission API call, alternated on a local 2-node Ray cluster started here on free ports (median of 3
  each), goal <= 0.5. ``--quick`` skips it (null).
* ``cpus`` and ``load_avg_1m_before``: the machine, and how busy it was before the run (the p99s count other work).

    python bench/queue.py [--quick]      (this file, through bench/queue.py)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from labtrain.queue.scheduler import Quota, Running, UserShare, Waiting, plan  # noqa: E402

ADMIN = "bench-admin-token-0123456789"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def schedule_cycle_ms() -> float:
    rng = random.Random(0)
    users = {f"u{i}": UserShare(f"u{i}", f"g{i % 10}", rng.choice([1.0, 2.0]), rng.uniform(0, 1e6), Quota(gpus=16, cpus=128, jobs=20)) for i in range(100)}
    running = [Running(f"r{i}", f"u{i % 100}", 1, -rng.uniform(0, 3600), 8, 1, 0, 7200) for i in range(60)]  # 480 of 512 CPUs
    waiting = [Waiting(f"w{i}", f"u{i % 100}", rng.choice([0, 1, 1, 2]), rng.uniform(0, 1e4), rng.choice([1, 4, 8, 32]), rng.choice([0, 0, 1, 8]), 0, rng.choice([600, 3600, 86400]))
               for i in range(10_000)]
    times = []
    for _ in range(20):
        start = time.perf_counter()
        plan(capacity=(512, 64, float("inf")), users=users, groups={}, running=running, waiting=waiting, now=0.0)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def store_cycle_ms() -> float:
    from labtrain.queue.spec import JobSpec, UserEntry
    from labtrain.queue.store import Store

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(os.path.join(tmp, "q.db"))
        for i in range(100):
            store.upsert_user(UserEntry(name=f"u{i}"))
        spec = JobSpec(job="jobs.shapes", config="c.yaml")
        with store.tx() as conn:  # 10,000 rows in one go (submit() is one transaction each)
            from labtrain.queue.store import jobs_t

            conn.execute(jobs_t.insert(), [{"id": f"lt-{i:06d}", "user": f"u{i % 100}", "job": spec.job, "config": spec.config, "overrides": [],
                                            "workers": 1, "cpus_per_worker": 1.0, "gpus_per_worker": 0.0, "priority": "normal", "time_limit_s": 3600.0,
                                            "state": "WAITING", "submitted_at": float(i), "queued_at": float(i), "attempt": 0, "num_preemptions": 0, "message": ""}
                                           for i in range(10_000)])
        times = []
        for _ in range(5):
            start = time.perf_counter()
            users, groups, running, waiting = store.snapshot(time.time(), 86400.0)
            plan(capacity=(0.5, 0, float("inf")), users=users, groups=groups, running=running, waiting=waiting, now=time.time())
            times.append((time.perf_counter() - start) * 1e3)
        store.engine.dispose()
        return statistics.median(times)


def start_service(tmp: str, ray_address: str | None, extra_env: dict | None = None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    users = "\n".join(f"- {{name: u{i}, token: bench-token-u{i}-0123456789}}" for i in range(10))
    Path(tmp, "users.yaml").write_text(users + "\n")
    env = {**os.environ, "LABTRAIN_QUEUE_DB": os.path.join(tmp, "queue.db"), "LABTRAIN_QUEUE_ADMIN_TOKEN": ADMIN,
           "LABTRAIN_QUEUE_USERS_FILE": os.path.join(tmp, "users.yaml"), "LABTRAIN_QUEUE_JOB_PATTERN": r"^(jobs|tests\.queue)\.[a-z_]+$",
           **(extra_env or {})}
    env.pop("LABTRAIN_QUEUE_RAY_ADDRESS", None)
    if ray_address:
        env["LABTRAIN_QUEUE_RAY_ADDRESS"] = ray_address
    proc = subprocess.Popen([sys.executable, "-m", "labtrain.queue", "serve", "--port", str(port), "--log-level", "warning"], env=env, cwd=REPO,
                            stdout=open(os.path.join(tmp, "server.log"), "ab"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/healthz", timeout=2).close()
            return proc, url
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"the queue did not start; see {tmp}/server.log") from None
            time.sleep(0.2)


def p99(values: list[float]) -> float:
    return sorted(values)[max(int(len(values) * 0.99) - 1, 0)]


def prefill_finished(db: str, num_jobs: int, num_users: int = 10) -> None:
    """``num_jobs`` finished jobs of the bench's users (one transaction), as a lab's store holds after months."""
    from labtrain.queue import store as st
    from labtrain.queue.spec import UserEntry

    store = st.Store(db)
    for i in range(num_users):
        store.upsert_user(UserEntry(name=f"u{i}"))
    states = [st.SUCCEEDED] * 6 + [st.FAILED, st.CANCELLED, st.TIMEOUT, st.SUCCEEDED]
    now = time.time()
    with store.tx() as conn:
        conn.execute(st.jobs_t.insert(), [{
            "id": f"lt-old{i:06d}", "user": f"u{i % num_users}", "job": "jobs.shapes", "config": "jobs/shapes/configs/demo.yaml", "overrides": ["epochs=1"],
            "workers": 2, "cpus_per_worker": 1.0, "gpus_per_worker": 0.0, "priority": "normal", "time_limit_s": 3600.0, "state": states[i % len(states)],
            "submitted_at": now - 86400 * 30 + i * 200, "queued_at": now - 86400 * 30 + i * 200, "started_at": now - 86400 * 30 + i * 200 + 60,
            "ended_at": now - 86400 * 30 + i * 200 + 160, "attempt": 1, "num_preemptions": int(i % 17 == 0), "message": ""} for i in range(num_jobs)])
    store.engine.dispose()


ACTIVE = "WAITING,DISPATCHING,RUNNING,PREEMPTING,CANCELLING"  # what `labtrain queue` and the page ask for


def api_latency(num_threads: int = 4, num_requests: int = 800, finished: int = 0) -> dict[str, float]:
    """p99 of submits, then of lists of one user's 200 jobs; with ``finished`` jobs in the store first, the lists
    ask for the active jobs (as `labtrain queue` does) and a third load pages through the history (50 a page)."""
    spec = {"job": "jobs.shapes", "config": "jobs/shapes/configs/demo.yaml", "overrides": ["epochs=1"], "resources": {"workers": 2}}
    with tempfile.TemporaryDirectory() as tmp:
        if finished:
            prefill_finished(os.path.join(tmp, "queue.db"), finished)
        proc, url = start_service(tmp, None)
        try:
            def load(method: str, path: str, out: list[float]) -> None:
                def worker(n: int, user: int) -> None:
                    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer bench-token-u{user}-0123456789"}) as http:
                        for _ in range(n):
                            start = time.perf_counter()
                            r = http.request(method, path, json=spec if method == "POST" else None)
                            out.append((time.perf_counter() - start) * 1e3)
                            assert r.status_code < 300, r.text
                threads = [threading.Thread(target=worker, args=(num_requests // num_threads, t)) for t in range(num_threads)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()

            submit_ms: list[float] = []
            list_ms: list[float] = []
            history_ms: list[float] = []
            load("POST", "/api/v1/jobs", submit_ms)
            load("GET", f"/api/v1/jobs?state={ACTIVE}" if finished else "/api/v1/jobs", list_ms)  # 4 users x 200 jobs each
            out = {"submit": p99(submit_ms), "list": p99(list_ms)}
            if finished:
                load("GET", "/api/v1/history?limit=50", history_ms)
                out["history"] = p99(history_ms)
            return out
        finally:
            proc.terminate()
            proc.wait(15)


def extra_start_s(repeats: int = 3) -> tuple[float, float, float]:
    from ray.job_submission import JobSubmissionClient

    from labtrain import cluster

    with tempfile.TemporaryDirectory() as tmp:
        spec = cluster.ClusterSpec(state_dir=os.path.join(tmp, "cluster"), gcs_port=free_port(), dashboard_port=free_port(), metrics_base_port=free_port(), queue_port=None)
        state = cluster.up(spec)
        proc = None
        try:
            proc, url = start_service(tmp, state.dashboard_url)  # the default cycle (0.5 s); a submit wakes the dispatcher
            ray = JobSubmissionClient(state.dashboard_url)
            config = str(REPO / "tests/queue/sleep.yaml")
            overrides = [f"marker_dir={tmp}", f"run.storage_path={tmp}/storage", "steps=1", "step_s=0.1"]
            http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"})

            def until_running(sid: str, start: float) -> float:
                while True:
                    try:
                        if ray.get_job_status(sid).value in ("RUNNING", "SUCCEEDED"):
                            return time.perf_counter() - start
                    except RuntimeError:
                        pass  # not submitted yet
                    time.sleep(0.02)

            direct, queued = [], []
            for i in range(repeats):
                start = time.perf_counter()
                sid = ray.submit_job(entrypoint=f"python -m tests.queue.sleepjob --config {config} {' '.join(overrides)} run.name=d{i}")
                direct.append(until_running(sid, start))
                time.sleep(1.0)
                start = time.perf_counter()
                job = http.post("/api/v1/jobs", json={"job": "tests.queue.sleepjob", "config": config, "overrides": overrides + [f"run.name=q{i}"]}).json()
                queued.append(until_running(job["id"], start))
                time.sleep(1.0)
            d, q = statistics.median(direct), statistics.median(queued)
            return q - d, d, q
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait(15)
            cluster.down(spec.state_dir)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="skip the Ray figure (queue_extra_start_s: null)")
    args = parser.parse_args()
    # The latencies are of a server and its 4 clients on this machine's cores: work running beside them shows up as
    # queueing in the p99s (on 2 cores, two busy processes beside the run took the submit p99 from about 25 to 63 ms).
    load_before = os.getloadavg()[0]
    result = {"schedule_cycle_ms": round(schedule_cycle_ms(), 2), "store_cycle_ms": round(store_cycle_ms(), 1)}
    plain = api_latency()
    result["submit_p99_ms"], result["list_p99_ms"] = round(plain["submit"], 1), round(plain["list"], 1)
    busy = api_latency(finished=10_000)
    result["list_p99_ms_10k_finished"], result["history_p99_ms_10k_finished"] = round(busy["list"], 1), round(busy["history"], 1)
    result["queue_extra_start_s"] = result["direct_start_s"] = result["queue_start_s"] = None
    if not args.quick:
        extra, direct, queued = extra_start_s()
        result.update(queue_extra_start_s=round(extra, 3), direct_start_s=round(direct, 3), queue_start_s=round(queued, 3))
    result["cpus"], result["load_avg_1m_before"] = os.cpu_count(), round(load_before, 2)
    result["goals"] = {"schedule_cycle_ms": 20, "submit_p99_ms": 50, "list_p99_ms": 50, "list_p99_ms_10k_finished": 50, "history_p99_ms_10k_finished": 50,
                       "queue_extra_start_s": 0.5}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
