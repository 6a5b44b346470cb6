"""The dispatcher: one loop that follows Ray, charges usage, runs the scheduler and submits what it admits.

Every Ray call is made *after* the state that asks for it is committed, and every Ray call is safe to
repeat: a submission is looked up by its submission id before it is made (Ray refuses a second job with
the same id anyway), and stopping a stopped job is a no-op. So a crash anywhere is repaired by the next
cycle of the restarted service.
"""

from __future__ import annotations

import logging
import os
import shlex
import threading
import time
from typing import Any

from labtrain import storage
from labtrain.launch import gang_flags
from labtrain.queue import store as st
from labtrain.queue.metrics import QueueMetrics
from labtrain.queue.scheduler import plan, reason
from labtrain.queue.spec import Settings

log = logging.getLogger("labtrain.queue")
TIME_LIMIT_MESSAGE = "stopped: time limit reached"
RAY_TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


CRASH_ENV = "LABTRAIN_QUEUE_CRASH_AT"
WRITE_REASONS = 200  # waiting jobs' REASONs written per cycle at most


def crash_point(name: str) -> None:
    """Fault injection for the crash tests: die at once (as SIGKILL would) where ``$LABTRAIN_QUEUE_CRASH_AT``
    names this point. Points: after_submit_commit, before_ray_submit, after_ray_submit."""
    if os.environ.get(CRASH_ENV) == name:
        os._exit(137)


class RayJobs:
    """The few Job Submission API calls the queue makes, on one JobSubmissionClient."""

    def __init__(self, address: str):
        self.address = address
        self._client = None
        self.largest_node: tuple[float, float] | None = None  # (CPUs, GPUs) of the biggest alive node

    @property
    def client(self):
        if self._client is None:  # connects (and checks the version) on first use: Ray may start after us
            from ray.job_submission import JobSubmissionClient

            self._client = JobSubmissionClient(self.address)
        return self._client

    def status(self, sid: str) -> tuple[str, str] | None:
        """(status, message) of a submission, or None when Ray has no job with that id."""
        try:
            info = self.client.get_job_info(sid)
        except RuntimeError as error:
            # Only Ray's own 404 means "no such job"; any other failure must not look like one, or a job
            # still running would be queued and started again.
            if "status code 404" in str(error):
                return None
            raise
        return str(info.status.value if hasattr(info.status, "value") else info.status), info.message or ""

    def nodes(self) -> list[dict[str, Any]]:
        """Each alive node's CPUs and GPUs, what is held on it and by which Ray submission: placement groups'
        bundles (Ray Train gangs), and running tasks and alive actors outside any group (NAS trials)."""
        from ray.util.state import list_actors, list_nodes, list_placement_groups, list_tasks

        kw = {"address": self.address, "detail": True, "raise_on_missing_output": False}
        nodes = {}
        for n in list_nodes(filters=[("state", "=", "ALIVE")], **kw):
            total = n.resources_total or {}
            nodes[n.node_id] = {"node_id": n.node_id, "ip": n.node_ip, "head": bool(n.is_head_node), "cpus": total.get("CPU", 0.0),
                                "gpus": total.get("GPU", 0.0), "cpus_used": 0.0, "gpus_used": 0.0, "holders": {}}
        submissions = {j.job_id: j.submission_id for j in self.client.list_jobs() if j.job_id}

        def hold(node_id: str | None, ray_job: str | None, resources: dict | None) -> None:
            node = nodes.get(node_id or "")
            cpus, gpus = (resources or {}).get("CPU", 0.0), (resources or {}).get("GPU", 0.0)
            if node is None or not (cpus or gpus):
                return
            node["cpus_used"] += cpus
            node["gpus_used"] += gpus
            holder = node["holders"].setdefault(submissions.get(ray_job) or ray_job or "?", {"cpus": 0.0, "gpus": 0.0})
            holder["cpus"] += cpus
            holder["gpus"] += gpus

        for pg in list_placement_groups(filters=[("state", "=", "CREATED")], **kw):
            for bundle in pg.bundles or []:
                hold(bundle.get("node_id"), pg.creator_job_id, bundle.get("unit_resources"))
        for task in list_tasks(filters=[("state", "=", "RUNNING")], **kw):
            if not task.placement_group_id and task.type == "NORMAL_TASK":
                hold(task.node_id, task.job_id, task.required_resources)
        for actor in list_actors(filters=[("state", "=", "ALIVE")], **kw):
            if not actor.placement_group_id:
                hold(actor.node_id, actor.job_id, actor.required_resources)
        return list(nodes.values())

    def submit(self, sid: str, entrypoint: str, metadata: dict[str, str]) -> None:
        try:
            self.client.submit_job(entrypoint=entrypoint, submission_id=sid, metadata=metadata)
        except RuntimeError as error:
            if "already exists" not in str(error):
                raise  # "already exists": an earlier try got through; the lookup will find it

    def stop(self, sid: str) -> None:
        self.client.stop_job(sid)

    def logs(self, sid: str) -> str:
        return self.client.get_job_logs(sid)

    def capacity(self) -> tuple[float, float, float]:
        """(CPUs, GPUs, memory bytes) of the live cluster's alive nodes."""
        from ray.util.state import list_nodes

        cpus = gpus = memory = 0.0
        largest = (0.0, 0.0)
        for node in list_nodes(address=self.address, filters=[("state", "=", "ALIVE")], detail=True, raise_on_missing_output=False):
            total = node.resources_total or {}
            cpus += total.get("CPU", 0.0)
            gpus += total.get("GPU", 0.0)
            memory += total.get("memory", 0.0)
            largest = (max(largest[0], total.get("CPU", 0.0)), max(largest[1], total.get("GPU", 0.0)))
        self.largest_node = largest
        return cpus, gpus, memory


def queue_job_id(submission_id: str | None) -> str | None:
    """The queue's job id of one of its Ray submissions (``<id>`` or ``<id>-r<attempt>``); None for others."""
    if not submission_id or not submission_id.startswith("lt-"):
        return None
    head, sep, tail = submission_id.rpartition("-r")
    return head if sep and tail.isdigit() else submission_id


def done_file(done_dir: str | None, job_id: str) -> str | None:
    return storage.join(done_dir, f"{job_id}.json") if done_dir else None


def entrypoint(row: dict[str, Any], job_cwd: str | None = None, done_dir: str | None = None) -> str:
    """``python -m <job> --config <file> <overrides> --workers ... --name <job id>``: the admitted gang in the
    contract every job's command line takes (labtrain.launch), which each job maps onto its own config. The
    name is the queue's job id unless the user's overrides set one, so every attempt of a job (after a
    preemption) resumes the same checkpoints. ``--done-file``: where the run records that it completed."""
    gang = gang_flags(row["workers"], row["cpus_per_worker"], row["gpus_per_worker"], row["memory_gb_per_worker"])
    done = done_file(done_dir, row["id"])
    if done:
        gang += ["--done-file", done]
    cmd = shlex.join(["python", "-m", row["job"], "--config", row["config"], *row["overrides"], *gang, "--name", row["id"]])
    return f"cd {shlex.quote(job_cwd)} && {cmd}" if job_cwd else cmd


class Dispatcher:
    def __init__(self, store: st.Store, settings: Settings, metrics: QueueMetrics, ray: RayJobs | None):
        self.store, self.settings, self.metrics, self.ray = store, settings, metrics, ray
        self._capacity: tuple[float, float, float] | None = tuple(
            settings.capacity.get(k, 0.0) for k in ("CPU", "GPU", "memory")) if settings.capacity else None
        self._capacity_at = -float("inf")
        self.nodes: list[dict[str, Any]] | None = None  # the cluster's nodes as last read (RayJobs.nodes), for the page
        self.nodes_at: float | None = None
        self.nodes_wanted_at = -float("inf")  # when the cluster view was last asked for (GET /api/v1/cluster)
        self._nodes_tried = -float("inf")
        self._missing: dict[str, int] = {}  # submission id -> consecutive cycles Ray said it has no such job
        self._reasons: dict[str, str] = {}  # waiting job -> the REASON last written
        self._wake = threading.Event()
        self.wait_order: dict[str, int] = {}  # job still waiting after the last cycle -> its place in the scheduling order
        self.done_dir = settings.resolved_done_dir()
        if self.done_dir and "://" not in self.done_dir:
            os.makedirs(self.done_dir, exist_ok=True)

    def poke(self) -> None:
        """Run the next cycle now (a job was submitted), not at the end of the current wait."""
        self._wake.set()

    def capacity(self, now: float, *, refresh: bool = False) -> tuple[float, float, float] | None:
        """The cluster's (CPUs, GPUs, memory). Only the dispatcher's cycle asks Ray (``refresh``, at most every
        5 s); requests read the last known figure, so an API call never waits on Ray."""
        if refresh and self.settings.capacity is None and self.ray is not None and now - self._capacity_at > 5.0:
            self._capacity_at = now  # a failure is retried in 5 s too, not on every cycle
            try:
                self._capacity = self.ray.capacity()
            except Exception as error:  # keep the last known capacity
                log.warning("cannot read the Ray cluster's resources: %s", error)

        cap = self._capacity
        if cap is not None and not any(cap[2:]):  # no memory figure: do not let memory requests block
            cap = (cap[0], cap[1], float("inf"))
        return cap

    # -- one cycle ---------------------------------------------------------------------------------------
    def cycle(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        s = self.settings
        if self.ray is not None:
            for row in self.store.jobs(states=st.HOLDING, limit=100_000):
                try:
                    self.follow(row, now)
                except Exception as error:
                    self.metrics.dispatch_errors.inc()
                    log.warning("following job %s (%s) failed: %s", row["id"], row["submission_id"], error)
        self.store.charge_running(now, half_life_s=s.half_life_s, gpu_weight=s.gpu_weight)
        self._refresh_nodes(now)
        users, groups, running, waiting = self.store.snapshot(now, s.half_life_s)
        self.metrics.observe_state(users, running, waiting)
        capacity = self.capacity(now, refresh=True)
        if capacity is None or self.ray is None:
            return
        result = plan(capacity=capacity, users=users, groups=groups, running=running, waiting=waiting, now=now, preemption=s.preemption)
        self.wait_order = {job_id: i for i, job_id in enumerate(result.waits)}  # plan() fills waits in scheduling order
        self._write_reasons(result)
        for job_id in result.preempt:
            if self.store.transition(job_id, [st.RUNNING], st.PREEMPTING, message=f"preempted for {result.head}"):
                self.metrics.preemptions.inc()
        for row in self.store.start_dispatch(result.admit, now):
            self.metrics.wait_seconds.observe(max(now - row["queued_at"], 0.0))
            try:
                self.ensure_submitted(row)
            except Exception as error:
                self.metrics.dispatch_errors.inc()
                log.warning("submitting job %s failed (retried next cycle): %s", row["id"], error)

    def _refresh_nodes(self, now: float) -> None:
        """What each node holds, read every 5 s while the cluster view was asked for in the last minute (five
        state-API listings: not worth a cycle when no page is open)."""
        if self.ray is None or now - self.nodes_wanted_at > 60.0 or now - self._nodes_tried < 5.0:
            return
        self._nodes_tried = now
        try:
            self.nodes, self.nodes_at = self.ray.nodes(), now
        except Exception as error:  # the page shows how old its view is
            log.warning("cannot read what the Ray cluster's nodes hold: %s", error)

    def _write_reasons(self, result) -> None:
        """Each waiting job's REASON in words, written only when it changed (a job the cycle did not reach
        keeps its last one), at most WRITE_REASONS a cycle so a queue of thousands never holds the store long."""
        changed = {}
        for job_id, why in result.waits.items():
            text = reason(why, result)
            if self._reasons.get(job_id) != text:
                changed[job_id] = self._reasons[job_id] = text
                if len(changed) >= WRITE_REASONS:
                    break
        if changed:
            self.store.set_waiting_messages(changed)
        if len(self._reasons) > 2 * max(len(result.waits), 1000):  # forget jobs that left the queue
            self._reasons = {k: v for k, v in self._reasons.items() if k in result.waits}

    def ensure_submitted(self, row: dict) -> None:
        """DISPATCHING -> RUNNING, submitting to Ray only if the submission id is not there yet."""
        sid = row["submission_id"]
        if self.ray.status(sid) is None:
            current = self.store.job(row["id"])
            if current is None or current["state"] != st.DISPATCHING:
                return  # cancelled since it was admitted: never start it
            crash_point("before_ray_submit")
            self.ray.submit(sid, entrypoint(row, self.settings.job_cwd, self.done_dir), {"labtrain_queue_job": row["id"], "user": row["user"]})
            crash_point("after_ray_submit")
        self.store.transition(row["id"], [st.DISPATCHING], st.RUNNING)

    def follow(self, row: dict, now: float) -> None:
        state, sid = row["state"], row["submission_id"]
        if state == st.DISPATCHING:  # left so by a crash, or Ray was unreachable at the submission
            self.ensure_submitted(row)
            return
        found = self.ray.status(sid)
        end = dict(now=now, half_life_s=self.settings.half_life_s, gpu_weight=self.settings.gpu_weight)
        if found is None:  # Ray forgot it (the cluster restarted): run it again from its checkpoint
            self._missing[sid] = self._missing.get(sid, 0) + 1
            if self._missing[sid] < 2:
                return  # said twice in a row before the job is requeued
            done, completed = done_file(self.done_dir, row["id"]), False
            if state == st.RUNNING and done:
                try:
                    completed = storage.exists(done)
                except Exception as error:  # the record cannot be read now: ask again next cycle, never guess
                    log.warning("cannot read the completion record %s of job %s: %s", done, row["id"], error)
                    return
            del self._missing[sid]
            if completed:  # it completed while the queue was away: never again
                self.store.end_holding(row["id"], [state], st.SUCCEEDED, message=f"completed (its record {done}; Ray no longer knows {sid})", **end)
                return
            final = {st.RUNNING: st.WAITING, st.PREEMPTING: st.WAITING, st.CANCELLING: st.CANCELLED}[state]
            self.store.end_holding(row["id"], [state], final, message=f"Ray has no job {sid}", **end)
            return
        self._missing.pop(sid, None)
        status, message = found
        if state == st.RUNNING:
            if status in RAY_TERMINAL:
                final = {"SUCCEEDED": st.SUCCEEDED, "FAILED": st.FAILED, "STOPPED": st.CANCELLED}[status]
                self.store.end_holding(row["id"], [st.RUNNING], final, message=self._reason(sid, status, message), **end)
            elif now - (row["started_at"] or now) > row["time_limit_s"]:
                self.store.transition(row["id"], [st.RUNNING], st.CANCELLING, message=TIME_LIMIT_MESSAGE)
                self.ray.stop(sid)
            return
        if status not in RAY_TERMINAL:
            self.ray.stop(sid)  # repeated each cycle until Ray reports it stopped
            return
        if state == st.PREEMPTING and status == "STOPPED":
            self.store.end_holding(row["id"], [st.PREEMPTING], st.WAITING, num_preemptions=row["num_preemptions"] + 1, **end)
        elif state == st.CANCELLING and status == "STOPPED":
            final = st.TIMEOUT if row["message"] == TIME_LIMIT_MESSAGE else st.CANCELLED
            self.store.end_holding(row["id"], [st.CANCELLING], final, message=row["message"] if final == st.TIMEOUT else "cancelled", **end)
        else:  # it ended on its own before the stop took effect
            final = st.SUCCEEDED if status == "SUCCEEDED" else st.FAILED
            self.store.end_holding(row["id"], [state], final, message=self._reason(sid, status, message), **end)

    def _reason(self, sid: str, status: str, message: str) -> str:
        """Why a job ended, in words: a failed job's own last ``error:`` line (every labtrain job ends with one)
        rather than Ray's "exit code 2, last available logs (truncated to 20,000 chars)"."""
        if status == "FAILED":
            try:
                lines = [line.strip() for line in self.ray.logs(sid).splitlines() if line.strip().startswith("error:")]
            except Exception as error:  # noqa: BLE001 - the logs are a nicety; Ray's message still says it failed
                log.warning("could not read the logs of %s: %s", sid, error)
                lines = []
            if lines:
                return lines[-1][:500]
        return message[-500:] or status.lower()

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            started = time.monotonic()
            try:
                self.cycle()
            except Exception:
                self.metrics.dispatch_errors.inc()
                log.exception("scheduling cycle failed")
            self._wake.wait(max(self.settings.cycle_s - (time.monotonic() - started), 0.0))
            self._wake.clear()
