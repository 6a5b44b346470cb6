"""The HTTP API without Ray: validation, authorization, users and quotas, metrics, the CLI's errors."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from tests.queue.conftest import ADMIN_TOKEN, SLEEP_CONFIG, TOKENS

LABTRAIN = [sys.executable, "-m", "labtrain.cli"]


@pytest.fixture
def server(make_server):
    return make_server(None)


def test_health_openapi_and_page(server):
    assert httpx.get(server.url + "/healthz").json() == {"ok": True}
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    assert {"/api/v1/jobs", "/api/v1/jobs/{job_id}", "/api/v1/jobs/{job_id}/cancel", "/api/v1/jobs/{job_id}/logs", "/api/v1/users"} <= set(paths)
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "api/v1/summary" in page.text


def test_bad_spec_is_refused_naming_the_field_and_nothing_is_queued(server):
    alice = server.client("alice")
    cases = {
        "resources.workers": {**server.sleep_spec("x"), "resources": {"workers": 0}},
        "priority": {**server.sleep_spec("x"), "priority": "urgent"},
        "job": {**server.sleep_spec("x"), "job": "os.system"},
        "resources.gpus_per_worker": {**server.sleep_spec("x"), "resources": {"gpus_per_worker": -1}},
        "overrides": {**server.sleep_spec("x"), "overrides": ["run.num_workers=8"]},
        "time_limit_s": {**server.sleep_spec("x"), "time_limit_s": 0},
        "colour": {**server.sleep_spec("x"), "colour": "red"},
    }
    for field, spec in cases.items():
        r = alice.post("/api/v1/jobs", json=spec)
        assert r.status_code == 422, (field, r.text)
        locs = [".".join(str(p) for p in e["loc"][1:]) for e in r.json()["detail"]]
        assert any(loc.startswith(field) for loc in locs), (field, locs)
    assert alice.get("/api/v1/jobs").json() == []


def test_quota_larger_than_a_job_is_refused(make_server):
    from tests.queue.conftest import users_list

    server = make_server(None, users=users_list(carol={"cpus": 2}))
    r = server.client("carol").post("/api/v1/jobs", json=server.sleep_spec("x", workers=2, cpus=2))
    assert r.status_code == 422 and "quota is 2" in r.text
    server.client("admin").put("/api/v1/groups/vision/quota", json={"quotas": {"gpus": 1}})
    r = server.client("alice").post("/api/v1/jobs", json={**server.sleep_spec("y"), "resources": {"workers": 2, "gpus_per_worker": 1}})
    assert r.status_code == 422 and "your group vision's quota is 1" in r.text
    assert server.client("alice").get("/api/v1/jobs").json() == []


def test_every_endpoint_as_the_wrong_user_is_refused(server):
    alice, bob = server.client("alice"), server.client("bob")
    job = alice.post("/api/v1/jobs", json=server.sleep_spec("a")).json()
    jid = job["id"]
    for method, path in (("GET", f"/api/v1/jobs/{jid}"), ("POST", f"/api/v1/jobs/{jid}/cancel"), ("GET", f"/api/v1/jobs/{jid}/logs")):
        assert bob.request(method, path).status_code == 404, path
        assert httpx.request(method, server.url + path).status_code == 401, path
        assert httpx.request(method, server.url + path, headers={"Authorization": "Bearer wrong-token-xxxxxxxxxxxxxxxx"}).status_code == 401, path
    assert bob.get("/api/v1/jobs").json() == []
    assert bob.get("/api/v1/jobs", params={"all": True}).json() == []  # all= is for admins only
    assert [j["id"] for j in bob.get("/api/v1/summary").json()["waiting"]] == []
    admin_only = (("GET", "/api/v1/users", None), ("POST", "/api/v1/users", {"name": "eve"}), ("PUT", "/api/v1/users/alice/quota", {"quotas": {"cpus": 1000}}),
                  ("GET", "/api/v1/groups", None), ("PUT", "/api/v1/groups/vision/quota", {"quotas": {"cpus": 1000}}))
    for method, path, body in admin_only:
        assert bob.request(method, path, json=body).status_code == 403, path
        assert httpx.request(method, server.url + path, json=body).status_code == 401, path
    public = {"/", "/healthz", "/metrics"}
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    assert len(paths) >= 10
    for path, operations in paths.items():  # every endpoint the spec lists, without a token
        if path in public:
            continue
        for method in operations:
            url = server.url + path.replace("{job_id}", jid).replace("{name}", "alice")
            assert httpx.request(method.upper(), url, json={}).status_code == 401, (method, path)
    assert alice.get(f"/api/v1/jobs/{jid}").json()["state"] == "WAITING"  # bob's cancel did nothing
    # The owner and an admin may.
    admin = server.client("admin")
    assert [j["id"] for j in admin.get("/api/v1/jobs", params={"all": True}).json()] == [jid]
    assert admin.post(f"/api/v1/jobs/{jid}/cancel").json()["state"] == "CANCELLED"


def test_admin_manages_users_and_quotas(server):
    admin = server.client("admin")
    r = admin.post("/api/v1/users", json={"name": "eve", "group": "nlp", "share": 2.0, "quotas": {"gpus": 4}})
    token = r.json()["token"]
    eve = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {token}"})
    assert eve.get("/api/v1/whoami").json() == {"name": "eve", "group": "nlp", "admin": False}
    admin.put("/api/v1/users/eve/quota", json={"quotas": {"cpus": 8, "jobs": 2}})
    users = {u["name"]: u for u in admin.get("/api/v1/users").json()}
    assert users["eve"]["quotas"] == {"cpus": 8, "gpus": 4, "jobs": 2} and users["eve"]["share"] == 2.0  # gpus left as it was
    answer = admin.put("/api/v1/users/eve/quota", json={"quotas": {"gpus": 100, "cpus": 1}}).json()
    assert (answer["cpus"], answer["gpus"], answer["jobs"]) == (1, 100, 2), "a quota not named is kept"
    admin.put("/api/v1/users/eve/quota", json={"quotas": {"jobs": None}})
    assert {u["name"]: u for u in admin.get("/api/v1/users").json()}["eve"]["quotas"] == {"cpus": 1, "gpus": 100, "jobs": None}
    assert "token" not in users["eve"] and "token_hash" not in users["eve"]
    r = admin.post("/api/v1/users", json={"name": "eve"})  # adding again would silently reset her quotas and token
    assert r.status_code == 409 and "exists" in r.text
    assert eve.get("/api/v1/whoami").status_code == 200


def test_request_id_makes_a_retried_submit_return_the_same_job(server):
    alice = server.client("alice")
    spec = {**server.sleep_spec("a"), "request_id": "retry-1"}
    first, second = alice.post("/api/v1/jobs", json=spec).json(), alice.post("/api/v1/jobs", json=spec).json()
    assert first["id"] == second["id"] and len(alice.get("/api/v1/jobs").json()) == 1


def test_metrics_pass_promtool(server):
    alice = server.client("alice")
    alice.post("/api/v1/jobs", json={**server.sleep_spec("a"), "priority": "high"})
    import time
    time.sleep(0.6)  # one cycle fills the gauges
    text = httpx.get(server.url + "/metrics").text
    assert 'labtrain_queue_waiting_jobs{priority="high",user="alice"} 1.0' in text
    for name in ("labtrain_queue_wait_seconds_bucket", "labtrain_queue_admitted_gpus", "labtrain_queue_admitted_cpus",
                 "labtrain_queue_fair_share_usage", "labtrain_queue_preemptions_total", "labtrain_queue_dispatch_errors_total"):
        assert name in text, name
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def test_cli_submit_queue_show_cancel_and_clear_errors(server, tmp_path):
    env = {"LABTRAIN_QUEUE_URL": server.url, "LABTRAIN_TOKEN": TOKENS["alice"], "LABTRAIN_QUEUE_CONFIG": str(tmp_path / "none.yaml"), "PATH": "/usr/bin:/bin"}
    run = lambda *a, **kw: subprocess.run([*LABTRAIN, *a], capture_output=True, text=True, env={**__import__("os").environ, **env, **kw}, timeout=60)
    sub = run("submit", SLEEP_CONFIG, "--job", "tests.queue.sleepjob", "--workers", "2", "--priority", "high", "--time-limit", "10m", "marker_dir=/tmp", "steps=1")
    assert sub.returncode == 0, sub.stderr
    jid = sub.stdout.strip()
    shown = run("show", jid, "--json")
    assert f'"id": "{jid}"' in shown.stdout and '"time_limit_s": 600.0' in shown.stdout and '"workers": 2' in shown.stdout
    table = run("queue")
    assert jid in table.stdout and "WAITING" in table.stdout and "high" in table.stdout
    assert "CANCELLED" in run("cancel", jid).stderr
    bad = run("submit", SLEEP_CONFIG, "--job", "tests.queue.sleepjob", "--workers", "0", "marker_dir=/tmp")
    assert bad.returncode == 2 and "resources.workers" in bad.stderr  # the job's check passes (0 is local mode); the queue refuses
    unchecked = run("submit", SLEEP_CONFIG, "--job", "tests.queue.sleepjob", "marker_dir=/tmp", "steps=abc")
    assert unchecked.returncode == 2 and "steps: value 'abc' is not allowed" in unchecked.stderr and "nothing was queued" in unchecked.stderr
    for argv, message in ((["--job", "tests.queue.nope"], "no such job module"), (["marker_dir=/tmp", "widht=8"], "widht: unknown key")):
        refused = run("submit", SLEEP_CONFIG, "--job", "tests.queue.sleepjob", *argv) if "--job" not in argv else run("submit", SLEEP_CONFIG, *argv)
        assert refused.returncode == 2 and message in refused.stderr, refused.stderr
    assert run("submit", str(tmp_path / "missing.yaml"), "--job", "tests.queue.sleepjob").returncode == 2
    pattern = run("submit", SLEEP_CONFIG, "--job", "other.job", "--no-check")  # the service's own refusal, brackets and all
    assert pattern.returncode == 2 and r"\.[a-z_]+$)" in pattern.stderr, pattern.stderr  # rich took "[a-z_]" for markup
    assert jid in run("queue", "--all-states").stdout and len(run("queue", "--all-states").stdout.splitlines()) == 2, "none of them was queued"
    denied = run("queue", LABTRAIN_TOKEN="not-a-token-xxxxxxxxxxxxxxxxxxx")
    assert denied.returncode == 2 and "refused the token" in denied.stderr
    down = run("queue", LABTRAIN_QUEUE_URL="http://127.0.0.1:9")
    assert down.returncode == 2 and "cannot reach the queue" in down.stderr
    assert run("show", "lt-nope").returncode == 2
    # users: admin only
    assert run("users", "list").returncode == 2
    admin = run("users", "add", "frank", "--gpus", "2", LABTRAIN_TOKEN=ADMIN_TOKEN)
    assert admin.returncode == 0 and len(admin.stdout.strip()) > 20
    assert run("users", "set-quota", "frank", "--cpus", "4", LABTRAIN_TOKEN=ADMIN_TOKEN).returncode == 0
    listed = run("users", "list", LABTRAIN_TOKEN=ADMIN_TOKEN)
    assert "frank" in listed.stdout
    # set-quota changes only what it names: the jobs limit survives a later --gpus/--cpus; 'none' removes one
    assert run("users", "set-quota", "frank", "--jobs", "1", LABTRAIN_TOKEN=ADMIN_TOKEN).returncode == 0
    later = run("users", "set-quota", "frank", "--gpus", "100", "--cpus", "1", LABTRAIN_TOKEN=ADMIN_TOKEN)
    assert later.returncode == 0 and "'jobs': 1" in later.stderr and "'gpus': 100" in later.stderr, later.stderr
    cleared = run("users", "set-quota", "frank", "--jobs", "none", LABTRAIN_TOKEN=ADMIN_TOKEN)
    assert "'jobs': None" in cleared.stderr and "'cpus': 1" in cleared.stderr, cleared.stderr


def test_history_and_show_say_what_happened_to_each_job(server, tmp_path):
    """`labtrain history` (like sacct) lists finished jobs with filters and paging; `labtrain show` gives a
    job's state history; the history API keeps users to their own jobs unless they are admins."""
    import json
    import os

    alice, bob, admin = server.client("alice"), server.client("bob"), server.client("admin")
    ids = [alice.post("/api/v1/jobs", json=server.sleep_spec(f"h{i}")).json()["id"] for i in range(5)]
    theirs = bob.post("/api/v1/jobs", json=server.sleep_spec("hb")).json()["id"]
    running = alice.post("/api/v1/jobs", json=server.sleep_spec("h-open")).json()["id"]
    for jid in [*ids, theirs]:
        assert alice.post(f"/api/v1/jobs/{jid}/cancel").status_code == (200 if jid != theirs else 404)
    assert bob.post(f"/api/v1/jobs/{theirs}/cancel").status_code == 200

    first = alice.get("/api/v1/history", params={"limit": 2}).json()
    assert [j["id"] for j in first["jobs"]] == ids[::-1][:2] and first["next"]
    rest = alice.get("/api/v1/history", params={"limit": 10, "before": first["next"]}).json()
    assert [j["id"] for j in rest["jobs"]] == ids[::-1][2:] and rest["next"] is None  # alice's own, none twice, not the waiting one
    assert {j["id"] for j in admin.get("/api/v1/history").json()["jobs"]} == {*ids, theirs}
    assert [j["id"] for j in admin.get("/api/v1/history", params={"user": "bob"}).json()["jobs"]] == [theirs]
    assert alice.get("/api/v1/history", params={"user": "bob"}).status_code == 403
    assert alice.get("/api/v1/history", params={"state": "SUCCEEDED"}).json()["jobs"] == []
    bad = alice.get("/api/v1/history", params={"state": "RUNNING"})
    assert bad.status_code == 422 and "RUNNING" in bad.text
    assert alice.get("/api/v1/history", params={"before": "yesterday"}).status_code == 422
    assert alice.get("/api/v1/history", params={"since": 0, "until": 1}).json()["jobs"] == []

    shown = alice.get(f"/api/v1/jobs/{ids[0]}").json()
    assert [(e["state"], e["message"]) for e in shown["events"]] == [("WAITING", "submitted"), ("CANCELLED", "cancelled while waiting")]

    env = {**os.environ, "LABTRAIN_QUEUE_URL": server.url, "LABTRAIN_TOKEN": TOKENS["alice"], "LABTRAIN_QUEUE_CONFIG": str(tmp_path / "none.yaml")}
    run = lambda *a: subprocess.run([*LABTRAIN, *a], capture_output=True, text=True, env=env, timeout=60)
    table = run("history", "--since", "1h", "--state", "CANCELLED")
    assert table.returncode == 0, table.stderr
    assert all(j in table.stdout for j in ids) and theirs not in table.stdout and running not in table.stdout
    assert table.stdout.splitlines()[0].split()[:4] == ["JOBID", "USER", "JOB", "STATE"]
    limited = run("history", "--limit", "2")
    assert len([line for line in limited.stdout.splitlines() if line.strip().startswith("lt-")]) == 2 and "--limit for more" in limited.stderr + limited.stdout
    assert run("history", "--since", "2099-01-01").stdout.count("lt-") == 0
    refused = run("history", "--since", "last week")
    assert refused.returncode == 2 and "--since 'last week'" in refused.stderr
    shown_cli = run("show", ids[0])
    assert shown_cli.returncode == 0 and "history" in shown_cli.stdout and "cancelled while waiting" in shown_cli.stdout
    assert json.loads(run("show", ids[0], "--json").stdout)["events"][0]["state"] == "WAITING"
