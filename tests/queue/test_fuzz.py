"""schemathesis fuzzes every operation of the served OpenAPI schema, as an admin and as a user:
no input may make the service fail (no 5xx), and it still answers afterwards."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.queue.conftest import ADMIN_TOKEN, TOKENS


@pytest.mark.parametrize("who", ["admin", "alice"])
def test_no_input_makes_the_service_fail(make_server, who, tmp_path):
    server = make_server(None)
    token = ADMIN_TOKEN if who == "admin" else TOKENS[who]
    st = Path(sys.executable).with_name("schemathesis")
    run = subprocess.run([str(st), "run", f"{server.url}/openapi.json", "-H", f"Authorization: Bearer {token}", "--checks", "not_a_server_error",
                          "--max-examples", "15", "--seed", "1", "--no-color"], capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:]
    if who == "admin":
        assert "401/403" not in run.stdout, run.stdout[-3000:]  # the admin's calls were not refused, so they reached the code
    assert " passed" in run.stdout, run.stdout[-3000:]
    assert httpx.get(server.url + "/healthz").json() == {"ok": True}
