"""The HTTP API (FastAPI; OpenAPI at /docs and /openapi.json), /metrics, /healthz and the web page at /."""

from __future__ import annotations

import logging
import re
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import orjson
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, PlainTextResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field
from starlette.concurrency import run_in_threadpool

from labtrain.queue import store as st
from labtrain.queue.curves import job_curves
from labtrain.queue.dispatcher import Dispatcher, RayJobs, crash_point, done_file, queue_job_id
from labtrain.queue.metrics import QueueMetrics
from labtrain.queue.scheduler import fair_share_factors
from labtrain.queue.spec import JobSpec, Quota, Settings, UserEntry, load_users_file

log = logging.getLogger("labtrain.queue")
PAGE = (Path(__file__).with_name("page.html")).read_text()


class Service:
    """What the endpoints share: the store, the dispatcher (None without a Ray address) and the metrics."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.store = st.Store(settings.db)
        self.metrics = QueueMetrics()
        if settings.admin_token:
            self.store.upsert_user(UserEntry(name="admin", group="admin", admin=True), token=settings.admin_token)
        if settings.users_file:
            users = load_users_file(settings.users_file)
            for group in users.groups:
                self.store.set_group_quota(group.name, Quota(**group.quotas.model_dump()))  # the file says every limit
            for user in users.users:
                self.store.upsert_user(user)
        self.dispatcher = Dispatcher(self.store, settings, self.metrics, RayJobs(settings.ray_address) if settings.ray_address else None)


def _public(row: dict) -> dict[str, Any]:
    """The row as the API shows it, changed in place (every caller holds a fresh dict from the store)."""
    row.pop("request_id", None)
    row["cpus"] = row["workers"] * row["cpus_per_worker"]
    row["gpus"] = row["workers"] * row["gpus_per_worker"]
    return row


def _refuse(field: str, message: str, value: Any = None, *, where: str = "body") -> HTTPException:
    """A 422 shaped like FastAPI's own validation errors, naming the field (of the body, or ``where="query"``)."""
    return HTTPException(422, detail=[{"loc": [where, *field.split(".")], "msg": message, "type": "value_error", "input": value}])


class QuotaUpdate(BaseModel):
    """Only the quotas named in ``quotas`` change (null removes a limit); ``share`` if given."""

    quotas: Quota
    share: float | None = Field(None, gt=0, le=1e6)


def create_app(settings: Settings, *, run_dispatcher: bool = True) -> FastAPI:
    service = Service(settings)
    stop = threading.Event()

    @asynccontextmanager
    async def lifespan(app):
        thread = None
        if run_dispatcher:
            thread = threading.Thread(target=service.dispatcher.run, args=(stop,), name="labtrain-queue-dispatcher", daemon=True)
            thread.start()
        yield
        stop.set()
        service.dispatcher.poke()
        if thread is not None:
            thread.join(30)

    app = FastAPI(title="labtrain queue", version="1", description="The shared lab queue in front of Ray.", lifespan=lifespan)
    app.state.service = service

    async def user(request: Request) -> dict:
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise HTTPException(401, "missing bearer token: pass --token or set LABTRAIN_TOKEN", headers={"WWW-Authenticate": "Bearer"})
        found = service.store.user_by_token(token.strip())
        if found is None:
            raise HTTPException(401, "unknown token", headers={"WWW-Authenticate": "Bearer"})
        return found

    def admin(me: dict = Depends(user)) -> dict:
        if not me["admin"]:
            raise HTTPException(403, "admins only")
        return me

    def own_job(job_id: str, me: dict) -> dict:
        row = service.store.job(job_id)
        if row is None or (row["user"] != me["name"] and not me["admin"]):
            raise HTTPException(404, f"no job {job_id} of yours")
        return row

    @app.get("/healthz")
    def healthz() -> dict:
        service.store.job("-")  # the store answers
        return {"ok": True}

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        return PlainTextResponse(generate_latest(service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        return HTMLResponse(PAGE)

    @app.get("/api/v1/whoami")
    def whoami(me: dict = Depends(user)) -> dict:
        return {"name": me["name"], "group": me["grp"], "admin": me["admin"]}

    @app.post("/api/v1/jobs", status_code=201)
    def submit(spec: JobSpec, me: dict = Depends(user)) -> dict:
        if not re.fullmatch(settings.job_pattern, spec.job):
            raise _refuse("job", f"job {spec.job!r} is not a job module this queue runs (allowed: {settings.job_pattern})", spec.job)
        res = spec.resources
        cap = service.dispatcher.capacity(time.time())
        if cap is not None and (res.cpus > cap[0] or res.gpus > cap[1]):
            raise _refuse("resources", f"the gang needs {res.cpus:g} CPUs and {res.gpus:g} GPUs; the whole cluster has {cap[0]:g} CPUs and {cap[1]:g} GPUs")
        node = service.dispatcher.ray.largest_node if service.dispatcher.ray is not None else None
        if node is not None and (res.cpus_per_worker > node[0] + 1e-9 or res.gpus_per_worker > node[1] + 1e-9):
            raise _refuse("resources", f"one worker needs {res.cpus_per_worker:g} CPUs and {res.gpus_per_worker:g} GPUs; the largest node has {node[0]:g} CPUs and {node[1]:g} GPUs, so it could never be placed")
        for what, need, limit in (("cpus", res.cpus, me["quota_cpus"]), ("gpus", res.gpus, me["quota_gpus"])):
            if limit is not None and need > limit:
                raise _refuse("resources", f"the gang needs {need:g} {what.upper()}; your quota is {limit:g}, so it could never start")
        group = next((g for g in service.store.groups() if g["name"] == me["grp"]), None)
        for what, need in (("cpus", res.cpus), ("gpus", res.gpus)):
            limit = group and group[f"quota_{what}"]
            if limit is not None and need > limit:
                raise _refuse("resources", f"the gang needs {need:g} {what.upper()}; your group {me['grp']}'s quota is {limit:g}, so it could never start")
        limit_s = spec.time_limit_s or settings.default_time_limit_s
        row, _created = service.store.submit(me["name"], spec, time_limit_s=limit_s)
        crash_point("after_submit_commit")
        service.dispatcher.poke()
        return _public(row)

    @app.get("/api/v1/jobs")
    async def list_jobs(all: bool = False, state: str | None = None, limit: int = Query(500, ge=1, le=10_000), me: dict = Depends(user)) -> Response:
        """Your jobs, newest first (an admin's ``all=true``: everyone's); ``state=WAITING,RUNNING`` filters."""
        states = state.upper().split(",") if state else None
        owner = None if (all and me["admin"]) else me["name"]
        # orjson straight from the rows: response-model validation would double the time, json.dumps adds a third.
        return Response(orjson.dumps([_public(r) for r in service.store.jobs(user=owner, states=states, limit=limit)]), media_type="application/json")

    @app.get("/api/v1/jobs/{job_id}")
    def show(job_id: str, me: dict = Depends(user)) -> dict:
        """The job and its state history (``events``: each state it entered, when, in which attempt, why)."""
        return {**_public(own_job(job_id, me)), "events": service.store.events(job_id)}

    @app.get("/api/v1/jobs/{job_id}/curves")
    def curves(job_id: str, me: dict = Depends(user)) -> dict:
        """The run's training curves as its TensorBoard events hold them: ``scalars`` {tag: [[step, value], ...]}
        (at most 300 points a tag), ``tensorboard`` (where they are), ``message`` (why there are none)."""
        own_job(job_id, me)
        return job_curves(done_file(service.dispatcher.done_dir, job_id))

    @app.get("/api/v1/history")
    async def history(
        user_name: str | None = Query(None, alias="user", description="Only this user's jobs (others than yourself: admins only)."),
        state: str | None = Query(None, description="Comma-separated among SUCCEEDED, FAILED, CANCELLED, TIMEOUT and PREEMPTED (finished after a preemption)."),
        since: float | None = Query(None, description="Ended at or after this Unix time."),
        until: float | None = Query(None, description="Ended before this Unix time."),
        before: str | None = Query(None, description="The `next` cursor of the previous page."),
        limit: int = Query(50, ge=1, le=1000),
        me: dict = Depends(user),
    ) -> Response:
        """Finished jobs, the latest to end first, a page at a time: ``{"jobs": [...], "next": cursor or null}``."""
        if user_name is not None and user_name != me["name"] and not me["admin"]:
            raise HTTPException(403, f"only admins see other users' history (you are {me['name']})")
        owner = user_name if user_name is not None else (None if me["admin"] else me["name"])
        states = [s for s in state.upper().split(",") if s] if state else None
        unknown = sorted(set(states or ()) - {*st.FINISHED, "PREEMPTED"})
        if unknown:
            raise _refuse("state", f"unknown state {', '.join(unknown)}: history has {', '.join(st.FINISHED)} and PREEMPTED", state, where="query")
        cursor = None
        if before:
            at, _, job_id = before.partition(":")
            try:
                cursor = (float(at), job_id)
            except ValueError:
                raise _refuse("before", "not a cursor this API gave (pass the `next` of the previous page)", before, where="query") from None
        rows = service.store.history(user=owner, states=states, since=since, until=until, before=cursor, limit=limit)
        following = f"{rows[-1]['ended_at']!r}:{rows[-1]['id']}" if len(rows) == limit else None
        return Response(orjson.dumps({"jobs": [_public(r) for r in rows], "next": following}), media_type="application/json")

    @app.post("/api/v1/jobs/{job_id}/cancel")
    def cancel(job_id: str, me: dict = Depends(user)) -> dict:
        own_job(job_id, me)
        return _public(service.store.request_cancel(job_id))

    @app.get("/api/v1/jobs/{job_id}/logs")
    def logs(job_id: str, me: dict = Depends(user)) -> dict:
        row = own_job(job_id, me)
        text = ""
        if row["submission_id"] and service.dispatcher.ray is not None:
            try:
                text = service.dispatcher.ray.logs(row["submission_id"])
            except Exception as error:
                raise HTTPException(502, f"Ray's job API did not give the logs of {row['submission_id']}: {error}") from error
        return {"id": job_id, "state": row["state"], "submission_id": row["submission_id"], "logs": text}

    @app.get("/api/v1/jobs/{job_id}/logs/stream", response_class=StreamingResponse)
    async def stream_logs(job_id: str, me: dict = Depends(user)) -> StreamingResponse:
        """The log of the job's current Ray submission as it is written (from its start), until that
        submission ends. 409 before the job has one; 502 while Ray does not know it yet."""
        row = await run_in_threadpool(own_job, job_id, me)  # the store and Ray's status are blocking calls
        ray = service.dispatcher.ray
        if not row["submission_id"] or ray is None:
            raise HTTPException(409, f"job {job_id} is {row['state']} and has no Ray submission to follow yet")
        sid = row["submission_id"]
        try:
            found = await run_in_threadpool(ray.status, sid)
        except Exception as error:
            raise HTTPException(502, f"Ray's job API did not answer for {sid}: {error}") from error
        if found is None:
            raise HTTPException(502, f"Ray does not know {sid} yet")

        async def chunks():
            try:
                async for text in ray.client.tail_job_logs(sid):
                    yield text
            except Exception as error:  # the stream broke; the client asks again or reads /logs
                yield f"\n[labtrain queue: the log stream of {sid} broke: {error}]\n"

        return StreamingResponse(chunks(), media_type="text/plain; charset=utf-8")

    @app.get("/api/v1/users")
    def users(me: dict = Depends(admin)) -> list[dict]:
        return [_user_view(u) for u in service.store.users()]

    @app.post("/api/v1/users", status_code=201)
    def add_user(entry: UserEntry, me: dict = Depends(admin)) -> dict:
        if any(u["name"] == entry.name for u in service.store.users()):
            raise HTTPException(409, f"user {entry.name} exists; change their quota or share with PUT /api/v1/users/{entry.name}/quota")
        token = entry.token or st.new_token()
        service.store.upsert_user(entry, token=token)
        return {"name": entry.name, "token": token}

    @app.put("/api/v1/users/{name}/quota")
    def set_user_quota(name: str, update: QuotaUpdate, me: dict = Depends(admin)) -> dict:
        row = service.store.set_user_quota(name, update.quotas, update.share)
        if row is None:
            raise HTTPException(404, f"no user {name}")
        return {"name": name, "cpus": row["quota_cpus"], "gpus": row["quota_gpus"], "jobs": row["quota_jobs"], "share": row["share"]}

    @app.get("/api/v1/groups")
    def groups(me: dict = Depends(admin)) -> list[dict]:
        return service.store.groups()

    @app.put("/api/v1/groups/{name}/quota")
    def set_group_quota(name: str, update: QuotaUpdate, me: dict = Depends(admin)) -> dict:
        row = service.store.set_group_quota(name, update.quotas)
        return {"name": name, "cpus": row["quota_cpus"], "gpus": row["quota_gpus"], "jobs": row["quota_jobs"]}

    @app.get("/api/v1/summary")
    def summary(me: dict = Depends(user)) -> dict:
        """What the web page shows: your (an admin: every) waiting and running job, each waiting one with its
        ``position`` among every user's waiting jobs (``waiting_total`` of them), every user's share and usage
        (decayed, and charged per UTC day over the last 14 days, today last)."""
        now = time.time()
        owner = None if me["admin"] else me["name"]
        rows = service.store.jobs(user=owner, states=[st.WAITING, *st.HOLDING], limit=2000)
        shares, _, _, everyone_waiting = service.store.snapshot(now, settings.half_life_s)
        factors = fair_share_factors(shares)
        by_day = service.store.usage_by_day(now, 14)
        waiting_now = {w.id for w in everyone_waiting}
        return {
            "me": me["name"], "admin": bool(me["admin"]), "now": now,
            "waiting": _in_scheduling_order([_public(r) for r in rows if r["state"] == st.WAITING], service.dispatcher.wait_order, waiting_now),
            "waiting_total": len(waiting_now),  # every user's: the places above count them
            "running": [_public(r) for r in rows if r["state"] != st.WAITING],
            "users": [{"name": u.name, "group": u.group, "share": u.share, "usage": u.usage, "fair_share": factors[u.name],
                       "usage_by_day": by_day.get(u.name, [0.0] * 14)} for u in shares.values()],
            "capacity": _capacity_view(service.dispatcher.capacity(now)),
        }

    @app.get("/api/v1/cluster")
    def cluster_view(me: dict = Depends(user)) -> dict:
        """Each node's CPUs and GPUs, used and free, and which jobs hold them (the queue's, by id; others by
        their Ray submission id); ``at``: when it was read (every 5 s by the dispatcher while someone looks,
        so it is not read for nobody), null before the first."""
        d = service.dispatcher
        d.nodes_wanted_at = time.time()
        nodes = []
        for n in d.nodes or []:
            holders = []
            for sid, held in sorted(n["holders"].items()):
                job = queue_job_id(sid)
                row = service.store.job(job) if job else None
                holders.append({"job": job if row is not None else None, "submission_id": sid, "user": row["user"] if row else None, **held})
            nodes.append({**{k: v for k, v in n.items() if k != "holders"}, "cpus_free": max(n["cpus"] - n["cpus_used"], 0.0),
                          "gpus_free": max(n["gpus"] - n["gpus_used"], 0.0), "holders": holders})
        return {"at": d.nodes_at, "nodes": sorted(nodes, key=lambda n: (not n["head"], n["ip"], n["node_id"]))}

    return app


def _in_scheduling_order(jobs: list[dict], order: dict[str, int], waiting_now: set[str]) -> list[dict]:
    """Waiting jobs in the order the last scheduling cycle considered them, each with its ``position`` in the whole
    queue: 1 starts next, counting every user's jobs still waiting (``waiting_now``), not jobs that started since
    that cycle, nor only the jobs shown (a user sees their own; "1" must not mean "first of yours"); None:
    submitted since that cycle, shown last."""
    ranked = sorted(order[job_id] for job_id in waiting_now if job_id in order)
    positions = {rank: i + 1 for i, rank in enumerate(ranked)}
    for j in jobs:
        j["position"] = positions.get(order[j["id"]]) if j["id"] in order else None
    return sorted(jobs, key=lambda j: (j["position"] is None, j["position"] or 0, j["submitted_at"]))


def _user_view(u: dict) -> dict:
    return {"name": u["name"], "group": u["grp"], "share": u["share"], "admin": u["admin"], "usage": u["usage"],
            "quotas": {"cpus": u["quota_cpus"], "gpus": u["quota_gpus"], "jobs": u["quota_jobs"]}}


def _capacity_view(cap: tuple[float, float, float] | None) -> dict | None:
    return None if cap is None else {"cpus": cap[0], "gpus": cap[1]}
