"""Crash safety: SIGKILL the service at random points while jobs are submitted and dispatched. After every
restart no acknowledged job is lost, a retried submit does not duplicate, and no job runs twice (checked
both in Ray's job list by submission id and by the jobs' own start markers)."""

from __future__ import annotations

import random
import threading
import time

import httpx
import pytest
from ray.job_submission import JobSubmissionClient

from tests.queue.conftest import TOKENS, wait_states

pytestmark = pytest.mark.slow


def test_sigkill_during_submit_and_dispatch_loses_nothing_and_runs_nothing_twice(make_server, ray_cluster):
    rng = random.Random(7)
    server = make_server(ray_cluster.dashboard_url)
    acked: dict[str, str] = {}  # request id -> job id
    sent: list[str] = []
    counter = iter(range(10_000))

    def spec(request_id: str) -> dict:
        name = request_id.replace("req", "k")
        return {**server.sleep_spec(name, steps=1, step_s=0.1), "request_id": request_id}

    def submitter(stop: threading.Event) -> None:
        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {TOKENS['alice']}"}, timeout=5) as http:
            while not stop.is_set():
                request_id = f"req{next(counter)}"
                sent.append(request_id)
                try:
                    r = http.post("/api/v1/jobs", json=spec(request_id))
                except httpx.TransportError:
                    return  # the service died under us; this request may or may not have been stored
                assert r.status_code == 201, r.text
                acked[request_id] = r.json()["id"]
                time.sleep(0.25)  # every job becomes a Ray job: fewer keep the test's minute down, the kill points stay random

    for _round in range(5):
        stop = threading.Event()
        thread = threading.Thread(target=submitter, args=(stop,))
        thread.start()
        time.sleep(rng.uniform(0.3, 2.5))
        server.kill()
        stop.set()
        thread.join(10)
        server.start()
        # A client whose answer was lost retries with the same request id, as `labtrain submit` does.
        alice = server.client("alice")
        for request_id in sent:
            if request_id not in acked:
                r = alice.post("/api/v1/jobs", json=spec(request_id))
                assert r.status_code == 201, r.text
                acked[request_id] = r.json()["id"]
        stored = {j["id"] for j in alice.get("/api/v1/jobs", params={"limit": 10_000}).json()}
        assert set(acked.values()) <= stored, "an acknowledged job was lost"
        assert len(stored) == len(acked), "a retried submit made a second job"
        time.sleep(rng.uniform(0.0, 1.5))  # and kill again while the dispatcher works through them

    assert len(acked) >= 10
    jobs = wait_states(server.client("alice"), list(acked.values()), timeout_s=240)
    ray_ids = [j.submission_id for j in JobSubmissionClient(ray_cluster.dashboard_url).list_jobs() if j.submission_id]  # drivers have none
    for job in jobs.values():
        assert job["attempt"] == 1 and ray_ids.count(job["submission_id"]) == 1
        assert not any(sid.startswith(job["id"] + "-") for sid in ray_ids)
    for request_id in acked:
        starts = [line for line in server.marker(request_id.replace("req", "k")) if line.startswith("start")]
        assert len(starts) == 1, (request_id, starts)


@pytest.mark.parametrize("point", ["after_submit_commit", "before_ray_submit", "after_ray_submit"])
def test_a_crash_at_each_step_of_submit_and_dispatch_is_repaired_once(make_server, ray_cluster, point):
    """The service dies (os._exit, as under SIGKILL) exactly between two steps: after the submit's commit but
    before its answer; after the dispatch's commit but before Ray hears of it; after Ray took the job but
    before the store says RUNNING. The restarted service finishes the job, which runs exactly once."""
    server = make_server(ray_cluster.dashboard_url)
    server.stop()
    server.env["LABTRAIN_QUEUE_CRASH_AT"] = point
    server.start()
    name = f"crash-{point.replace('_', '-')}"
    spec = {**server.sleep_spec(name, steps=1, step_s=0.1), "request_id": f"req-{point}"}
    try:
        answer = server.client("alice").post("/api/v1/jobs", json=spec)
        assert point != "after_submit_commit", f"the service answered {answer.status_code} instead of dying"
    except httpx.TransportError:
        assert point == "after_submit_commit"
    assert server.proc.wait(30) == 137, "the service did not die at the crash point"
    del server.env["LABTRAIN_QUEUE_CRASH_AT"]
    server.start()
    alice = server.client("alice")
    job_id = alice.post("/api/v1/jobs", json=spec).json()["id"]  # the client's retry: the same job
    assert [j["id"] for j in alice.get("/api/v1/jobs").json()] == [job_id]
    job = wait_states(alice, [job_id], timeout_s=120)[job_id]
    assert job["attempt"] == 1
    ray_ids = [j.submission_id for j in JobSubmissionClient(ray_cluster.dashboard_url).list_jobs()]
    assert ray_ids.count(job_id) == 1
    assert len([line for line in server.marker(name) if line.startswith("start")]) == 1  # the job's own record of its runs
