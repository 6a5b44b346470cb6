"""Exactly once with completion records on S3 (the Helm chart's setting when the storage root is a bucket):
the job's driver writes its record through the job contract (``--done-file``), and a dispatcher whose Ray
has forgotten the job (a restarted cluster) reads it and never runs the job again."""

from __future__ import annotations

import shlex

from labtrain.launch import job_arguments, mark_done
from labtrain.queue import store as st
from labtrain.queue.dispatcher import Dispatcher
from labtrain.queue.metrics import QueueMetrics
from labtrain.queue.spec import JobSpec, Settings, UserEntry


class ForgetfulRay:
    """Ray's job API as the dispatcher sees it; ``forget()`` is a cluster restart (every job unknown)."""

    def __init__(self):
        self.jobs: dict[str, str] = {}  # submission id -> entrypoint
        self.largest_node = None

    def status(self, sid):
        return ("RUNNING", "") if sid in self.jobs else None

    def submit(self, sid, entrypoint, metadata):
        self.jobs[sid] = entrypoint

    def stop(self, sid):
        pass

    def forget(self):
        self.jobs.clear()


def test_a_completion_record_on_s3_keeps_a_finished_job_from_running_again(s3_bucket, tmp_path, monkeypatch):
    bucket, s3_cfg = s3_bucket
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_cfg.endpoint_url)  # the chart sets the AWS variables in both pods
    store = st.Store(str(tmp_path / "queue.db"))
    store.upsert_user(UserEntry(name="alice"))
    settings = Settings(db=str(tmp_path / "queue.db"), done_dir=f"s3://{bucket}/queue/done/", capacity={"CPU": 4, "GPU": 0})
    ray = ForgetfulRay()
    dispatcher = Dispatcher(store, settings, QueueMetrics(), ray)
    spec = JobSpec(job="jobs.shapes", config="jobs/shapes/configs/demo.yaml", resources={"workers": 1})
    finished, unfinished = (store.submit("alice", spec, time_limit_s=3600)[0]["id"] for _ in range(2))
    dispatcher.cycle()
    assert {store.job(i)["state"] for i in (finished, unfinished)} == {st.RUNNING}

    argv = shlex.split(ray.jobs[finished])  # the job's own command line, parsed by the job contract
    args = job_arguments("python -m jobs.shapes", "").parse_args(argv[argv.index("--config"):])
    assert args.done_file == f"s3://{bucket}/queue/done/{finished}.json"
    mark_done(args)  # the run completed, with the queue away

    ray.forget()
    for _ in range(3):  # Ray must say twice that it has no such job
        dispatcher.cycle()
    job = store.job(finished)
    assert job["state"] == st.SUCCEEDED and job["attempt"] == 1 and args.done_file in job["message"], job
    assert store.job(unfinished)["attempt"] == 2, "the job without a record runs again"
    assert finished not in ray.jobs and f"{finished}-r2" not in ray.jobs


def test_queue_job_id_of_each_attempts_submission():
    from labtrain.queue.dispatcher import queue_job_id

    assert queue_job_id("lt-0a1b2c3d4e") == "lt-0a1b2c3d4e" and queue_job_id("lt-0a1b2c3d4e-r3") == "lt-0a1b2c3d4e"
    assert queue_job_id("raysubmit_abc") is None and queue_job_id(None) is None


def test_waiting_jobs_are_shown_in_the_last_cycles_scheduling_order():
    from labtrain.queue.api import _in_scheduling_order

    jobs = [{"id": i, "submitted_at": t} for i, t in (("a", 1.0), ("b", 2.0), ("c", 3.0), ("new", 4.0), ("newer", 5.0))]  # one user's
    order = {"c": 0, "x-started-meanwhile": 1, "bobs": 2, "a": 3, "b": 4}  # the plan put c first (priority or fair share)
    waiting_now = {"a", "b", "c", "new", "newer", "bobs"}  # every user's, as the store holds them now
    shown = _in_scheduling_order(jobs, order, waiting_now)
    assert [(j["id"], j["position"]) for j in shown] == [("c", 1), ("a", 3), ("b", 4), ("new", None), ("newer", None)]  # a waits behind bob's job
