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
    body = re.search(rf'<table id="{table}">.*?<tbody>(.*?)</tbody>', dom, re.S).group(1)
    return [[unescape(c) for c in re.findall(r"<td>(.*?)</td>", row)] for row in re.findall(r"<tr>(.*?)</tr>", body, re.S)]


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


def test_page_without_a_token_asks_for_one(make_server, tmp_path):
    server = make_server(None)
    dom = render(server.url + "/", tmp_path)
    assert "enter your token to see the queue" in dom and "<tr><td>" not in dom
