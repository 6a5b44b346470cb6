"""The queue in front of a real 2-node local Ray cluster (4 CPUs): fair share, gangs and backfill, quotas,
cancel, preemption with resume. Jobs are tests/queue/sleepjob.py: they take no Ray resources themselves, so
only the queue's accounting decides what runs at once."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest
from ray.job_submission import JobSubmissionClient

from tests.queue.conftest import job_state, users_list, wait_for, wait_states

pytestmark = pytest.mark.slow


def submit(client, spec) -> str:
    r = client.post("/api/v1/jobs", json=spec)
    assert r.status_code == 201, r.text
    return r.json()["id"]


def test_one_job_runs_with_the_admitted_resources_and_its_logs(make_server, ray_cluster):
    server = make_server(ray_cluster.dashboard_url)
    alice = server.client("alice")
    jid = submit(alice, server.sleep_spec("one", workers=2, cpus=1.5))
    job = wait_states(alice, [jid])[jid]
    assert job["attempt"] == 1 and job["submission_id"] == jid
    assert server.marker("one")[0].startswith("start step=0 workers=2 cpus=1.5 gpus=0")
    assert JobSubmissionClient(ray_cluster.dashboard_url).get_job_status(jid).value == "SUCCEEDED"
    assert "sleepjob one done" in alice.get(f"/api/v1/jobs/{jid}/logs").json()["logs"]
    streamed = alice.get(f"/api/v1/jobs/{jid}/logs/stream")  # Ray's log tail, to the end of the submission
    assert streamed.status_code == 200 and "sleepjob one done" in streamed.text
    assert server.client("bob").get(f"/api/v1/jobs/{jid}/logs/stream").status_code == 404
    usage = {u["name"]: u["usage"] for u in alice.get("/api/v1/summary").json()["users"]}
    assert usage["alice"] > 0 and usage["bob"] == 0


def test_two_users_interleave_by_fair_share(make_server, ray_cluster):
    server = make_server(ray_cluster.dashboard_url)
    alice, bob = server.client("alice"), server.client("bob")
    # Every job takes the whole cluster (4 CPUs), so they run one at a time; alice queued all hers first.
    ids = [submit(alice, server.sleep_spec(f"fa{i}", workers=2, cpus=2)) for i in range(3)]
    ids += [submit(bob, server.sleep_spec(f"fb{i}", workers=2, cpus=2)) for i in range(3)]
    jobs = wait_states(server.client("admin"), ids, timeout_s=180)
    users = [j["user"] for j in sorted(jobs.values(), key=lambda j: j["started_at"])]
    assert users[:2] == ["alice", "bob"], users  # FIFO would run all of alice's first
    assert max(len(list(g)) for _, g in itertools.groupby(users)) <= 2, users


def test_gang_waits_while_short_jobs_backfill(make_server, ray_cluster):
    server = make_server(ray_cluster.dashboard_url)
    alice, admin = server.client("alice"), server.client("admin")
    first = submit(alice, {**server.sleep_spec("g-first", workers=2, steps=12, step_s=0.5), "time_limit_s": 60})
    wait_for(lambda: job_state(alice, first)["state"] == "RUNNING", 30, what="the first job to run")
    gang = submit(alice, {**server.sleep_spec("g-gang", workers=4), "time_limit_s": 60})  # needs all 4 CPUs: waits for `first`
    # Both alice's, so behind her gang in the order: starting before the gang can only be backfill (bob's
    # would go ahead of the gang by fair share once `first` charged alice).
    short = submit(alice, {**server.sleep_spec("g-short", workers=2), "time_limit_s": 20})  # ends before `first` may end: backfills
    long = submit(alice, {**server.sleep_spec("g-long", workers=2), "time_limit_s": 3600})  # could delay the gang: waits
    jobs = wait_states(admin, [first, gang, short, long], timeout_s=120)
    assert jobs[short]["started_at"] < min(jobs[first]["ended_at"], jobs[gang]["started_at"]), "the short job did not backfill"
    assert jobs[gang]["started_at"] >= jobs[first]["ended_at"]
    assert jobs[gang]["started_at"] >= jobs[short]["ended_at"]
    assert jobs[long]["started_at"] >= jobs[gang]["started_at"], "the long job jumped ahead of the gang"


def test_quotas_hold(make_server, ray_cluster):
    server = make_server(ray_cluster.dashboard_url, users=users_list(carol={"jobs": 1}, dave={"cpus": 2}))
    carol, dave, admin = server.client("carol"), server.client("dave"), server.client("admin")
    ids = [submit(carol, server.sleep_spec(f"qc{i}", step_s=0.3)) for i in range(3)]
    ids += [submit(dave, server.sleep_spec(f"qd{i}", step_s=0.3)) for i in range(3)]
    jobs = wait_states(admin, ids, timeout_s=120)
    for user, limit in (("carol", 1), ("dave", 2)):  # carol: 1 job at a time; dave: 2 CPUs = 2 one-CPU jobs
        spans = [(j["started_at"], j["ended_at"]) for j in jobs.values() if j["user"] == user]
        for t, _ in spans:
            assert sum(1 for s, e in spans if s <= t < e) <= limit, (user, spans)


def test_cancel_stops_the_ray_job(make_server, ray_cluster):
    server = make_server(ray_cluster.dashboard_url)
    alice = server.client("alice")
    jid = submit(alice, server.sleep_spec("c-long", steps=600, step_s=0.5))
    wait_for(lambda: server.marker("c-long")[1:], 60, what="the job to take a step")
    assert alice.post(f"/api/v1/jobs/{jid}/cancel").json()["state"] == "CANCELLING"
    wait_states(alice, [jid], states=("CANCELLED",), timeout_s=60)
    assert JobSubmissionClient(ray_cluster.dashboard_url).get_job_status(jid).value == "STOPPED"
    steps = len(server.marker("c-long"))
    time.sleep(1.5)
    assert len(server.marker("c-long")) == steps, "the job kept running after its cancel"


def test_preempted_job_resumes_from_its_checkpoint_and_finishes(make_server, ray_cluster):
    server = make_server(ray_cluster.dashboard_url)
    alice, bob, admin = server.client("alice"), server.client("bob"), server.client("admin")
    low = submit(alice, {**server.sleep_spec("p-low", workers=4, steps=10, step_s=0.4), "priority": "low"})
    wait_for(lambda: sum(line.startswith("step") for line in server.marker("p-low")) >= 3, 60, what="3 steps of the low job")
    high = submit(bob, {**server.sleep_spec("p-high", workers=2), "priority": "high"})
    jobs = wait_states(admin, [low, high], timeout_s=120)
    assert jobs[low]["num_preemptions"] == 1 and jobs[low]["attempt"] == 2
    assert jobs[high]["started_at"] < jobs[low]["started_at"]  # the low job's second attempt came after
    starts = [line for line in server.marker("p-low") if line.startswith("start")]
    assert len(starts) == 2 and starts[0].startswith("start step=0")
    resumed = int(starts[1].split()[1].split("=")[1])
    assert resumed >= 3, starts  # it continued from its checkpoint, not from step 0
    assert server.marker("p-low")[-1] == "done"
    ray = JobSubmissionClient(ray_cluster.dashboard_url)
    assert ray.get_job_status(low).value == "STOPPED" and ray.get_job_status(f"{low}-r2").value == "SUCCEEDED"
    metrics = __import__("httpx").get(server.url + "/metrics").text
    assert "labtrain_queue_preemptions_total 1.0" in metrics


def test_a_preempted_nas_search_continues_from_its_saved_state(make_server, ray_cluster):
    """NAS through the queue, preempted: its four concurrent trials (the gang) stop, and the second attempt
    continues the same search (named by the queue's job id) from its state.json instead of starting again."""
    import json
    import os

    from tests.conftest import REPO
    from tests.jobs.nas.conftest import NB201_TABLE

    server = make_server(ray_cluster.dashboard_url, extra_args=["--job-cwd", str(REPO)])
    alice, bob, admin = server.client("alice"), server.client("bob"), server.client("admin")
    budget = 16
    low = submit(alice, {"job": "jobs.nas", "config": "jobs/nas/configs/nb201_table.yaml", "priority": "low", "resources": {"workers": 4, "cpus_per_worker": 1},
                         "overrides": [f"evaluator.path={NB201_TABLE}", "evaluator.seconds_per_query=1.5", "search.methods=[random]", f"search.budget={budget}"]})
    state_file = Path(os.environ["LABTRAIN_STORAGE_ROOT"]) / "nas" / low / "state.json"

    def finished() -> int:
        try:
            trials = json.loads(state_file.read_text())["methods"]["random"]["trials"]
        except (OSError, ValueError, KeyError):
            return 0
        return sum(t["status"] != "pending" for t in trials)

    wait_for(lambda: finished() >= 4, 120, what="4 finished trials of the search")

    def holders() -> dict[str, float]:  # the cluster view: which jobs hold CPUs on which node
        view = alice.get("/api/v1/cluster").json()
        if view["at"] is None:
            return {}  # not read yet: the dispatcher reads the nodes once the view is asked for
        nodes = view["nodes"]
        assert len(nodes) == 2 and all(n["cpus"] == 2 and n["cpus_used"] + n["cpus_free"] == 2 for n in nodes), nodes
        return {h["job"]: h["cpus"] for n in nodes for h in n["holders"] if h["job"]}

    wait_for(lambda: holders().get(low, 0) >= 1, 30, what="the search's trials on the cluster view")
    high = submit(bob, {**server.sleep_spec("nas-high", workers=2), "priority": "high"})
    jobs = wait_states(admin, [low, high], timeout_s=240)
    assert jobs[low]["num_preemptions"] == 1 and jobs[low]["attempt"] == 2, jobs[low]
    ray = JobSubmissionClient(ray_cluster.dashboard_url)
    assert ray.get_job_status(low).value == "STOPPED"
    second = ray.get_job_logs(f"{low}-r2")
    resumed = int(second.split("random: ")[1].split("/")[0])
    assert resumed >= 4, second[-3000:]  # it continued from the saved trials, not from 0
    assert f"random: {budget} done, 0 failed" in second
    trials = json.loads(state_file.read_text())["methods"]["random"]["trials"]
    assert len(trials) == budget and len({t["arch"] for t in trials}) == budget  # no architecture run twice


def test_time_limit_stops_a_job_and_cli_logs_follow(make_server, ray_cluster):
    import os
    import subprocess
    import sys

    from tests.queue.conftest import TOKENS

    server = make_server(ray_cluster.dashboard_url)
    alice = server.client("alice")
    jid = submit(alice, {**server.sleep_spec("t-limit", steps=600, step_s=0.2), "time_limit_s": 3})
    env = {**os.environ, "LABTRAIN_QUEUE_URL": server.url, "LABTRAIN_TOKEN": TOKENS["alice"]}
    follow = subprocess.run([sys.executable, "-m", "labtrain.cli", "logs", jid, "-f"], capture_output=True, text=True, env=env, timeout=120)
    # -f returned once the job ended, with status 1: it did not succeed
    assert follow.returncode == 1 and "sleepjob t-limit starting at step 0" in follow.stdout, follow.stdout + follow.stderr
    assert "TIMEOUT" in follow.stderr
    job = job_state(alice, jid)
    assert job["state"] == "TIMEOUT" and 3 <= job["ended_at"] - job["started_at"] < 30, job
    assert "done" not in server.marker("t-limit")


def test_shapes_job_runs_through_the_queue_on_its_admitted_gang(make_server, ray_cluster, tmp_path):
    """The real platform job: the queue's run.* overrides size its Ray Train gang; it trains and finishes."""
    from tests.conftest import REPO

    server = make_server(ray_cluster.dashboard_url, extra_args=["--job-cwd", str(REPO)])
    alice = server.client("alice")
    overrides = ["epochs=1", "synthetic.write=true", "synthetic.num_samples=128", "synthetic.samples_per_shard=64", "data.num_workers=0", "data.shuffle_buffer=0",
                 f"data.urls={tmp_path}/shapes/shard-{{000000..000001}}.tar", f"run.storage_path={tmp_path}/ckpt", "num_val_samples=64", "checkpoint_every=2", "run.log_every=1"]
    jid = submit(alice, {"job": "jobs.shapes", "config": "jobs/shapes/configs/demo.yaml", "overrides": overrides,
                         "resources": {"workers": 2, "cpus_per_worker": 1}, "time_limit_s": 600})
    wait_states(alice, [jid], timeout_s=300)
    logs = alice.get(f"/api/v1/jobs/{jid}/logs").json()["logs"]
    assert (tmp_path / "ckpt" / jid).is_dir(), logs[-2000:]  # run.name defaults to the queue's job id
    # its curves, as its TensorBoard events hold them (the page's charts)
    curves = alice.get(f"/api/v1/jobs/{jid}/curves").json()
    assert curves["tensorboard"] == f"{tmp_path}/ckpt/{jid}/tensorboard", curves
    scalars = curves["scalars"]
    assert {"train/loss", "perf/samples_per_s", "perf/data_wait_share"} <= set(scalars), sorted(scalars)
    steps = [step for step, _ in scalars["train/loss"]]
    assert len(steps) >= 2 and steps == sorted(steps) and all(v > 0 for _, v in scalars["perf/samples_per_s"]), scalars
    assert server.client("bob").get(f"/api/v1/jobs/{jid}/curves").status_code == 404
    none_yet = alice.get(f"/api/v1/jobs/{submit(alice, server.sleep_spec('no-curves', steps=0))}/curves").json()
    assert none_yet["scalars"] == {} and "not started" in none_yet["message"]


def test_the_service_runs_jobs_on_postgresql(make_server, ray_cluster, postgres_url):
    """The same service on PostgreSQL: a job runs through Ray, another is cancelled, both end recorded; a
    restart (SIGKILL) keeps them."""
    server = make_server(ray_cluster.dashboard_url, db=postgres_url)
    alice = server.client("alice")
    done = submit(alice, server.sleep_spec("pg-one"))
    long = submit(alice, server.sleep_spec("pg-long", steps=200, step_s=0.2))
    wait_for(lambda: job_state(alice, long)["state"] == "RUNNING", 60, what="the long job to run")
    alice.post(f"/api/v1/jobs/{long}/cancel")
    jobs = wait_states(alice, [done, long], states=("SUCCEEDED", "CANCELLED"))
    assert (jobs[done]["state"], jobs[long]["state"]) == ("SUCCEEDED", "CANCELLED")
    server.kill()
    server.start()
    assert {j["id"]: j["state"] for j in server.client("alice").get("/api/v1/jobs").json()} == {done: "SUCCEEDED", long: "CANCELLED"}


def test_a_failed_job_says_why_in_its_own_words(make_server, ray_cluster):
    server = make_server(ray_cluster.dashboard_url)
    alice = server.client("alice")
    jid = submit(alice, {**server.sleep_spec("f-fails", steps=1), "overrides": [*server.sleep_spec("f-fails", steps=1)["overrides"], "fail=true"]})
    job = wait_states(alice, [jid], states=("FAILED",))[jid]
    assert job["state"] == "FAILED" and job["message"] == "error: sleepjob failed as asked (fail=true)", job["message"]


def test_a_job_that_completed_while_the_queue_was_down_is_not_run_again(make_server, ray_cluster):
    """The queue dies while a job runs; the job completes; Ray then forgets it (as a cluster restart does);
    the restarted queue finds the run's completion record and marks it succeeded, with one attempt."""
    server = make_server(ray_cluster.dashboard_url)
    alice = server.client("alice")
    jid = submit(alice, server.sleep_spec("x-once", steps=6, step_s=0.5))
    wait_for(lambda: job_state(alice, jid)["state"] == "RUNNING", 60, what="the job to run")
    server.kill()
    ray = JobSubmissionClient(ray_cluster.dashboard_url)
    wait_for(lambda: ray.get_job_status(jid).value == "SUCCEEDED", 120, what="the job to finish with the queue down")
    time.sleep(3)  # the job's supervisor actor exits after the job: deleting before that makes Ray record it FAILED again
    assert ray.delete_job(jid)  # Ray forgets it, as after a restart of the cluster

    def forgotten() -> bool:
        try:
            ray.get_job_info(jid)
        except RuntimeError as error:
            return "404" in str(error)
        return False

    wait_for(forgotten, 30, what="Ray to forget the job")
    time.sleep(2)
    assert forgotten()
    server.start()
    job = wait_states(server.client("alice"), [jid], timeout_s=60)[jid]
    assert job["state"] == "SUCCEEDED" and job["attempt"] == 1 and "completed" in job["message"], job
    time.sleep(2)  # a few more cycles: nothing starts it again
    assert [line for line in server.marker("x-once") if line.startswith("start")] == [server.marker("x-once")[0]]
