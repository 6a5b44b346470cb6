"""The web page as a person sees it: headless Chromium loads /, runs its script, and the DOM is checked."""

from __future__ import annotations

import re
import shutil
import subprocess
from html import unescape

import pytest

from tests.queue.conftest import TOKENS


def render(url: str, tmp_path) -> str:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is not installed (apt-get install chromium)")
    args = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", f"--user-data-dir={tmp_path / 'profile'}",
            "--virtual-time-budget=5000", "--dump-dom", url]
    return subprocess.run(args, capture_output=True, text=True, timeout=90, check=True).stdout


def cells(dom: str, table: str) -> list[list[str]]:
    """A table's body as text (a job id's link shows as its text)."""
    body = re.search(rf'<table id="{table}">.*?<tbody>(.*?)</tbody>', dom, re.S).group(1)
    return [[unescape(re.sub(r"<[^>]+>", "", c)) for c in re.findall(r"<td>(.*?)</td>", row, re.S)] for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)]


def headers_and_labels(dom: str) -> None:
    """Accessibility basics: every table has column headers, every form control a label."""
    for table in re.findall(r'<table id="([\w-]+)">', dom):
        head = re.search(rf'<table id="{table}">.*?<thead>(.*?)</thead>', dom, re.S)
        assert head and '<th scope="col">' in head.group(1), f"table {table} has no column headers"
    for control in re.findall(r"<(?:input|select)[^>]*>", dom):
        assert re.search(r'id="([\w-]+)"', control), control
        name = re.search(r'id="([\w-]+)"', control).group(1)
        assert re.search(rf'<label>[^<]*<(?:input|select)[^>]*id="{name}"', dom), f"control {name} has no label"


def test_page_shows_your_queue_and_everyones_share(make_server, tmp_path):
    server = make_server(None)
    mine = server.client("alice").post("/api/v1/jobs", json={**server.sleep_spec("page", workers=2), "priority": "high"}).json()["id"]
    theirs = server.client("bob").post("/api/v1/jobs", json=server.sleep_spec("bob")).json()["id"]
    dom = render(f"{server.url}/#token={TOKENS['alice']}", tmp_path)
    assert "signed in as alice" in dom and "1 waiting" in dom
    waiting = cells(dom, "waiting")
    assert [row[:5] for row in waiting] == [[mine, "alice", "tests.queue.sleepjob", "high", "2"]]
    assert theirs not in dom  # bob's job is not alice's to see
    users = {row[0]: row for row in cells(dom, "users")}
    assert {"alice", "bob", "carol", "dave"} <= set(users) and users["alice"][1] == "vision" and users["alice"][4] == "1.000"
    assert dom.count('<svg width="84" height="24" role="img"><title>resource-seconds per day, oldest first: 0, 0,') >= 4  # 14 days each


def test_page_without_a_token_asks_for_one(make_server, tmp_path):
    server = make_server(None)
    dom = render(server.url + "/", tmp_path)
    assert "enter your token to see the queue" in dom and "<tr><td>" not in dom


def test_page_with_a_refused_token_asks_for_another(make_server, tmp_path):
    server = make_server(None)
    dom = render(f"{server.url}/#token=not-a-token-0123456789", tmp_path)
    assert "the queue refused this token; enter yours" in dom
    assert '<form id="login">' in dom  # shown again (no hidden attribute)


@pytest.mark.slow
def test_page_shows_a_running_job_on_a_live_cluster(make_server, ray_cluster, tmp_path):
    from tests.queue.conftest import job_state, wait_for, wait_states

    server = make_server(ray_cluster.dashboard_url)
    alice = server.client("alice")
    jid = alice.post("/api/v1/jobs", json=server.sleep_spec("page-run", workers=2, steps=100, step_s=0.2)).json()["id"]
    wait_for(lambda: job_state(alice, jid)["state"] == "RUNNING", 60, what="the job to run")
    try:
        dom = render(f"{server.url}/#token={TOKENS['alice']}", tmp_path)
        assert "1 running, 0 waiting" in dom and "cluster 4 CPUs, 0 GPUs" in dom
        (row,) = cells(dom, "running")
        assert row[:7] == [jid, "alice", "RUNNING", "tests.queue.sleepjob", "normal", "2", "0"]

        # Where is my job: its place counts every user's waiting jobs, though alice sees only her own.
        bobs = server.client("bob").post("/api/v1/jobs", json=server.sleep_spec("page-bob", workers=4)).json()["id"]
        placed = lambda client, job: any(j["id"] == job and j["position"] for j in client.get("/api/v1/summary").json()["waiting"])  # noqa: E731
        wait_for(lambda: placed(server.client("admin"), bobs), 30, what="a cycle to place bob's job")
        mine = alice.post("/api/v1/jobs", json=server.sleep_spec("page-wait", workers=4)).json()["id"]
        wait_for(lambda: placed(alice, mine), 30, what="a cycle to place alice's job")
        dom = render(f"{server.url}/#token={TOKENS['alice']}", tmp_path / "queued")
        assert "1 running, 1 waiting (2 in the queue)" in dom
        (row,) = cells(dom, "waiting")
        assert row[0] == mine and row[-1] == "2 of 2", row  # behind bob's job (alice also holds CPUs: fair share agrees)
    finally:
        jobs = [j["id"] for j in server.client("admin").get("/api/v1/jobs", params={"all": True}).json()]
        for j in jobs:
            server.client("admin").post(f"/api/v1/jobs/{j}/cancel")
        wait_states(server.client("admin"), jobs, states=("CANCELLED",), timeout_s=60)  # leave no Ray job behind


def test_page_job_view_history_and_controls(make_server, tmp_path):
    """#job=<id> opens a job: its spec, its state history, and a cancel control for its owner and admins only;
    the history table lists finished jobs with their reason."""
    from tests.queue.conftest import ADMIN_TOKEN

    server = make_server(None)
    alice = server.client("alice")
    active = alice.post("/api/v1/jobs", json=server.sleep_spec("view", workers=2)).json()["id"]
    gone = alice.post("/api/v1/jobs", json=server.sleep_spec("gone")).json()["id"]
    alice.post(f"/api/v1/jobs/{gone}/cancel")

    dom = render(f"{server.url}/#token={TOKENS['alice']}&job={active}", tmp_path)
    assert f"Job {active}: WAITING" in dom and "tests.queue.sleepjob" in dom
    assert [row[1:] for row in cells(dom, "job-events")] == [["WAITING", "0", "submitted"]]
    assert re.search(r'<button id="job-cancel" type="button">', dom), "the owner sees the cancel control"
    assert "(no log yet: the job has not started)" in dom
    history = cells(dom, "history")
    assert [(row[0], row[3], row[7]) for row in history] == [(gone, "CANCELLED", "cancelled while waiting")]
    assert [row[0] for row in cells(dom, "waiting")] == [active]
    headers_and_labels(dom)

    dom = render(f"{server.url}/#token={TOKENS['alice']}&job={gone}", tmp_path / "finished")
    assert f"Job {gone}: CANCELLED" in dom and re.search(r'<button id="job-cancel" type="button" hidden', dom), "nothing to cancel"
    dom = render(f"{server.url}/#token={TOKENS['bob']}&job={active}", tmp_path / "bob")
    assert f"no job {active} of yours" in dom and active not in "".join(sum(cells(dom, "waiting"), []))  # bob neither sees it nor cancels it
    dom = render(f"{server.url}/#token={ADMIN_TOKEN}&job={active}", tmp_path / "admin")
    assert f"Job {active}: WAITING" in dom and re.search(r'<button id="job-cancel" type="button">', dom), "an admin may cancel anyone's job"


def test_page_draws_a_runs_curves_from_its_tensorboard_events(make_server, tmp_path):
    """The job view charts what the run's TensorBoard events hold (the run says where in its run record)."""
    import json

    from torch.utils.tensorboard import SummaryWriter

    server = make_server(None)
    jid = server.client("alice").post("/api/v1/jobs", json=server.sleep_spec("curves")).json()["id"]
    events = tmp_path / "tb"
    with SummaryWriter(str(events)) as writer:
        for step in range(1, 21):
            writer.add_scalar("train/loss", 2.0 / step, step)
            writer.add_scalar("perf/samples_per_s", 100.0 + step, step)
    (server.tmp / "done").mkdir(exist_ok=True)
    (server.tmp / "done" / f"{jid}.run.json").write_text(json.dumps({"name": jid, "tensorboard": str(events)}))
    dom = render(f"{server.url}/#token={TOKENS['alice']}&job={jid}", tmp_path / "browser")
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", dom)
    assert captions == ["perf/samples_per_s: 120.0 (step 20; range 101 to 120)", "train/loss: 0.1000 (step 20; range 0.100 to 2.00)"], captions
    assert dom.count("<polyline") == 2 and f"from {events}" in dom
