"""s3:// for webdataset and fsspec, through s3fs, with retries on transient errors.

webdataset opens URLs through ``webdataset.gopen.gopen_schemes``, which has no ``s3`` entry. Importing
``labtrain.data`` registers :func:`gopen_s3` there, so every process that unpickles a labtrain pipeline
(DataLoader workers, Ray workers) can read s3:// shards; that opener uses the standard AWS variables.
labtrain's own readers and writers take the :class:`~labtrain.config.S3Config` of the config they serve
(``data.s3``, ``run.s3``): there is no process-wide S3 setting for one stream to overwrite another's.
"""

from __future__ import annotations

import io
import logging
import os
import time
from typing import IO, Any, Callable, TypeVar

from webdataset.gopen import gopen_schemes

from labtrain.config import S3Config

log = logging.getLogger(__name__)
T = TypeVar("T")

def storage_options(cfg: S3Config | None = None) -> dict[str, Any]:
    """fsspec/s3fs keyword arguments for ``cfg``; unset fields are left to botocore's own lookup."""
    cfg = cfg or S3Config()
    options: dict[str, Any] = {}
    endpoint = cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        options["endpoint_url"] = endpoint
    if cfg.access_key_id:
        options["key"] = cfg.access_key_id
    if cfg.secret_access_key:
        options["secret"] = cfg.secret_access_key
    if cfg.region:
        # s3fs passes client_kwargs to botocore; the region belongs there, not next to the endpoint.
        options["client_kwargs"] = {"region_name": cfg.region}
    return options


def filesystem(cfg: S3Config | None = None):
    """An s3fs filesystem for ``cfg`` (default: the standard AWS environment variables). fsspec caches instances per
    process and drops them after a fork, so DataLoader workers get their own connections."""
    import s3fs

    # No listings cache: checkpoints appear under prefixes this process may have listed before.
    return s3fs.S3FileSystem(**storage_options(cfg), default_block_size=8 * 2**20, use_listings_cache=False)


def is_transient(error: BaseException) -> bool:
    """A network or throttling error worth retrying (a missing or forbidden object is not)."""
    if isinstance(error, (FileNotFoundError, PermissionError)):
        return False
    return isinstance(error, (OSError, ConnectionError, TimeoutError)) or "Throttl" in type(error).__name__


def with_retries(fn: Callable[[], T], *, what: str, cfg: S3Config | None = None) -> T:
    """Call ``fn``; on a transient error wait ``backoff_s * 2**attempt`` and try again, up to ``max_attempts``."""
    cfg = cfg or S3Config()
    for attempt in range(cfg.max_attempts):
        try:
            return fn()
        except Exception as error:  # noqa: BLE001 - re-raised below unless transient
            if not is_transient(error) or attempt == cfg.max_attempts - 1:
                raise
            delay = cfg.backoff_s * 2**attempt
            log.warning("transient error on %s (attempt %d/%d), retrying in %.2fs: %s", what, attempt + 1, cfg.max_attempts, delay, error)
            time.sleep(delay)
    raise AssertionError("unreachable")


def open_url(url: str, mode: str = "rb", cfg: S3Config | None = None) -> IO[bytes]:
    """Open a local path or s3:// URL (on ``cfg``'s store, default: the AWS environment's); s3 opens are
    retried on transient errors."""
    if url.startswith("s3://"):
        fs = filesystem(cfg)
        stream = with_retries(lambda: fs.open(url, mode), what=url, cfg=cfg)
        if mode == "rb":
            # s3fs serves every read from its block cache in Python; tar parsing makes many small reads
            # (512-byte headers), so a C buffer in front of it makes S3 reading about as fast as a file's.
            return io.BufferedReader(stream, buffer_size=2**20)
        return stream
    if url.startswith("file:"):
        url = url[len("file:"):]
    return open(url, mode, buffering=2**20)  # large reads: tar parsing asks for 512-byte pieces


def gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192) -> IO[bytes]:
    """webdataset's opener signature for s3:// URLs (the AWS environment's store)."""
    del bufsize  # s3fs buffers by block
    return open_url(url, mode)


def register() -> None:
    """Make webdataset open s3:// through s3fs in this process (done on import of labtrain.data)."""
    gopen_schemes["s3"] = gopen_s3
