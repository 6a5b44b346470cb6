"""Shards that must exist before a run starts, and the one way a job writes its synthetic corpus.

A job never trains on data nobody asked for: shards missing at a local path stop the run with an error
naming the path, unless the job's config asks for its synthetic corpus to be written there (``write``).
"""

from __future__ import annotations

import os
from typing import Callable, Iterable

from labtrain.config import ConfigError, DataConfig
from labtrain.data.index import expand_urls
from labtrain.data.writer import write_shards


def local_shards_missing(urls: str) -> bool:
    """True when ``urls`` names local shards and none of them exists (s3:// is checked by the stream)."""
    if "://" in urls:
        return False
    return not any(os.path.exists(u) for u in expand_urls(urls))


def require_shards(
    data: DataConfig,
    *,
    field: str,
    write: bool,
    write_field: str,
    samples: Callable[[], Iterable[dict]],
    total: int,
    samples_per_shard: int,
    what: str = "samples",
) -> DataConfig:
    """``data``, its shards guaranteed to exist.

    Missing local shards are written from ``samples()`` (the job's synthetic corpus) when ``write`` is true,
    into the folder of ``data.urls``; the returned config then names exactly the shards written. Otherwise a
    ConfigError names ``field``, the path, and ``write_field``, the switch that writes the corpus.
    """
    if not local_shards_missing(data.urls):
        return data
    if not write:
        raise ConfigError(
            f"{field}: no shards at {data.urls}. Check the path (relative paths are under LABTRAIN_STORAGE_ROOT, "
            f"default ./runs), or write the job's synthetic corpus there with {write_field}=true"
        )
    out = os.path.dirname(data.urls)
    print(f"writing {total} synthetic {what} to {out} ({write_field}=true)", flush=True)
    pattern = write_shards(samples(), out, total=total, max_samples=samples_per_shard)
    return data.model_copy(update={"urls": pattern, "index": None})
