"""The queue's HTTP client, used by the ``labtrain`` CLI. Errors become :class:`QueueError` with a message
a person can act on (unreachable service, bad token, refused spec)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import httpx
import yaml

CONFIG_FILE = Path("~/.config/labtrain/queue.yaml").expanduser()


class QueueError(Exception):
    """A request the queue refused or could not answer; ``exit_code`` for the CLI."""

    def __init__(self, message: str, exit_code: int = 2, status: int | None = None):
        super().__init__(message)
        self.exit_code = exit_code
        self.status = status  # the HTTP status, None when the service was not reached


def _read_client_file(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise QueueError(f"cannot read the queue client file {path}: {error}") from None
    if not isinstance(data, dict):
        raise QueueError(f"the queue client file {path} must be a mapping with url: and token:")
    return data


def resolve(url: str | None, token: str | None) -> tuple[str, str | None]:
    """Flags, then env (LABTRAIN_QUEUE_URL, LABTRAIN_TOKEN), then ~/.config/labtrain/queue.yaml (url:, token:;
    LABTRAIN_QUEUE_CONFIG names another file), then the embedded local cluster's queue
    (``<LABTRAIN_CLUSTER_DIR, default .labtrain/cluster>/queue.yaml``, written by ``labtrain cluster up``)."""
    user_file = _read_client_file(Path(os.environ.get("LABTRAIN_QUEUE_CONFIG", CONFIG_FILE)))
    local_file = _read_client_file(Path(os.environ.get("LABTRAIN_CLUSTER_DIR", ".labtrain/cluster")) / "queue.yaml")
    file = user_file or local_file
    url = url or os.environ.get("LABTRAIN_QUEUE_URL") or file.get("url") or "http://127.0.0.1:8000"
    token = token or os.environ.get("LABTRAIN_TOKEN") or file.get("token")
    return url.rstrip("/"), token


def _explain(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = response.text
    if isinstance(detail, list):  # validation errors: name each field
        return "; ".join(f"{'.'.join(str(p) for p in e.get('loc', []) if p != 'body') or 'spec'}: {e.get('msg')}" for e in detail)
    return str(detail)


class QueueClient:
    def __init__(self, url: str, token: str | None, *, timeout_s: float = 30):
        self.url = url
        self._http = httpx.Client(base_url=url, timeout=timeout_s, headers={"Authorization": f"Bearer {token}"} if token else {})

    def request(self, method: str, path: str, **kwargs) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as error:
            raise QueueError(f"cannot reach the queue at {self.url}: {error}; is it running? (set --url or LABTRAIN_QUEUE_URL)") from None
        if response.status_code == 401:
            raise QueueError(f"the queue refused the token: {_explain(response)}")
        if response.status_code == 422:
            raise QueueError(f"refused: {_explain(response)}")
        if response.status_code >= 400:
            raise QueueError(f"{response.status_code}: {_explain(response)}", status=response.status_code)
        return response.json()

    def submit(self, spec: dict) -> dict:
        spec = {"request_id": uuid.uuid4().hex, **spec}
        for attempt in range(3):  # the request id makes a retry after a lost answer return the same job
            try:
                return self.request("POST", "/api/v1/jobs", json=spec)
            except QueueError as error:
                if attempt == 2 or not str(error).startswith("cannot reach"):
                    raise
        raise AssertionError("unreachable")

    def jobs(self, *, all: bool = False, state: str | None = None) -> list[dict]:
        params = {"all": all} | ({"state": state} if state else {})
        return self.request("GET", "/api/v1/jobs", params=params)

    def history(self, *, user: str | None = None, state: str | None = None, since: float | None = None, until: float | None = None,
                limit: int = 50) -> list[dict]:
        """Finished jobs, the latest to end first, up to ``limit`` (fetched a page at a time)."""
        params = {k: v for k, v in {"user": user, "state": state, "since": since, "until": until}.items() if v is not None}
        out: list[dict] = []
        cursor = None
        while len(out) < limit:
            page = self.request("GET", "/api/v1/history", params={**params, "limit": min(limit - len(out), 500), **({"before": cursor} if cursor else {})})
            out += page["jobs"]
            cursor = page["next"]
            if cursor is None:
                break
        return out

    def job(self, job_id: str) -> dict:
        return self.request("GET", f"/api/v1/jobs/{job_id}")

    def cancel(self, job_id: str) -> dict:
        return self.request("POST", f"/api/v1/jobs/{job_id}/cancel")

    def logs(self, job_id: str) -> dict:
        return self.request("GET", f"/api/v1/jobs/{job_id}/logs")

    def stream_logs(self, job_id: str):
        """The current submission's log, chunk by chunk, as Ray writes it; ends when that submission ends."""
        try:
            with self._http.stream("GET", f"/api/v1/jobs/{job_id}/logs/stream", timeout=httpx.Timeout(30, read=None)) as response:
                if response.status_code >= 400:
                    response.read()
                    raise QueueError(f"{response.status_code}: {_explain(response)}", status=response.status_code)
                yield from response.iter_text()
        except httpx.TransportError as error:
            raise QueueError(f"the log stream from {self.url} broke: {error}", status=None) from None
