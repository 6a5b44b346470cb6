"""The queue's page driven in a real browser (Playwright on Debian's chromium): sign in with a token, open a
running job, see its log lines arrive, cancel it and see its state change; another user gets no control over
it. Screenshots land in test-artifacts/page/ (not committed)."""

from __future__ import annotations

import re
import shutil

import pytest

from tests.conftest import REPO
from tests.queue.conftest import TOKENS, job_state, wait_for, wait_states

pytestmark = pytest.mark.slow
ARTIFACTS = REPO / "test-artifacts" / "page"


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail("chromium is not installed (apt-get install chromium, or make tools)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        yield browser
        browser.close()


def test_sign_in_follow_a_running_jobs_log_and_cancel_it(make_server, ray_cluster, browser):
    from playwright.sync_api import expect

    server = make_server(ray_cluster.dashboard_url)
    alice = server.client("alice")
    jid = alice.post("/api/v1/jobs", json=server.sleep_spec("browser-run", steps=600, step_s=0.25)).json()["id"]
    waiting = alice.post("/api/v1/jobs", json=server.sleep_spec("browser-wait", workers=4)).json()["id"]  # waits behind it
    done = alice.post("/api/v1/jobs", json=server.sleep_spec("browser-gone")).json()["id"]
    alice.post(f"/api/v1/jobs/{done}/cancel")
    wait_for(lambda: job_state(alice, jid)["state"] == "RUNNING", 60, what="the job to run")
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(server.url + "/")
        expect(page.locator("#status")).to_contain_text("enter your token")
        page.get_by_label("Token").fill(TOKENS["alice"])
        page.get_by_role("button", name="Show").click()
        expect(page.locator("#status")).to_contain_text("signed in as alice")
        expect(page.locator("#waiting tbody tr")).to_have_count(1)
        expect(page.locator("#waiting tbody td").last).to_have_text("1 of 1")  # next to start, of every user's waiting jobs
        expect(page.locator("#waiting tbody")).to_contain_text("waiting for CPUs to free up")  # why it waits
        expect(page.locator("#cluster tbody tr")).to_have_count(2, timeout=15_000)  # the 2 nodes, read once the page asks
        expect(page.locator("#cluster-age")).to_contain_text("s ago")  # how old the nodes' view is
        expect(page.locator("#history tbody")).to_contain_text(done)
        page.screenshot(path=str(ARTIFACTS / "queue.png"), full_page=True)

        page.get_by_role("link", name=jid).first.click()
        expect(page.locator("#job-title")).to_contain_text(f"Job {jid}: RUNNING")
        log = page.locator("#job-log")
        expect(log).to_contain_text("sleepjob browser-run step", timeout=30_000)
        last = max(int(n) for n in re.findall(r" step (\d+)", log.inner_text()))
        expect(log).to_contain_text(f"sleepjob browser-run step {last + 3}\n", timeout=30_000)  # lines keep arriving
        page.screenshot(path=str(ARTIFACTS / "job-running.png"), full_page=True)

        other = browser.new_page()
        other.goto(f"{server.url}/#token={TOKENS['bob']}&job={jid}")
        expect(other.locator("#job-title")).to_contain_text("no job")
        expect(other.locator("#job-cancel")).to_be_hidden()
        assert TOKENS["bob"] not in other.url  # the token left the address
        other.close()

        page.get_by_role("button", name="Cancel this job").click()
        expect(page.locator("#job-title")).to_contain_text(f"Job {jid}: CANCELLED", timeout=60_000)
        expect(page.locator("#job-cancel")).to_be_hidden()
        expect(page.locator("#job-events")).to_contain_text("cancel requested")
        page.screenshot(path=str(ARTIFACTS / "job-cancelled.png"), full_page=True)
        assert job_state(alice, jid)["state"] == "CANCELLED"
    finally:
        for j in (jid, waiting):
            alice.post(f"/api/v1/jobs/{j}/cancel")
        wait_states(alice, [jid, waiting], states=("CANCELLED", "SUCCEEDED"), timeout_s=120)
