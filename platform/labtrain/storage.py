"""Where a run's files live: the storage root, path resolution in configs, and checkpoint storage.

Relative paths in a config (fields typed :data:`~labtrain.config.StoragePath`, at any depth) live under
the storage root, ``$LABTRAIN_STORAGE_ROOT`` (a shared filesystem path or ``s3://bucket/prefix``; the local
cluster sets it to the checkout's ``runs/``), else ``./runs``. S3 settings are never process-wide: every
function that touches s3:// takes the :class:`~labtrain.config.S3Config` it should use.
"""

from __future__ import annotations

import os
import posixpath
import typing
from typing import Any, TypeVar

from labtrain.config import Config, PathField, RunConfig, S3Config

C = TypeVar("C", bound=Config)

STORAGE_ROOT_ENV = "LABTRAIN_STORAGE_ROOT"


def storage_root() -> str:
    return os.environ.get(STORAGE_ROOT_ENV) or os.path.abspath("runs")


def resolve_path(path: str) -> str:
    """``path`` as every worker must see it: URLs and absolute paths as they are, others under the storage root."""
    if "://" in path or os.path.isabs(path):
        return path
    root = storage_root()
    return f"{root.rstrip('/')}/{path}" if "://" in root else os.path.join(root, path)


def join(base: str, *parts: str) -> str:
    """``base/part/...`` for a local path or an s3:// URL."""
    return posixpath.join(base, *parts) if "://" in base else os.path.join(base, *parts)


def _marker(field) -> PathField | None:
    """The PathField of a pydantic field, also inside ``StoragePath | None``."""
    for meta in field.metadata:
        if isinstance(meta, PathField):
            return meta
    for arg in typing.get_args(field.annotation):
        for meta in getattr(arg, "__metadata__", ()):
            if isinstance(meta, PathField):
                return meta
    return None


def resolve_paths(cfg: C) -> C:
    """``cfg`` with every storage-path field, at any depth, resolved by :func:`resolve_path`, so every
    worker, whatever its working directory (a Ray job's working_dir copy is private to it), reads and writes
    the same files. Jobs never resolve paths by hand."""
    updates: dict[str, Any] = {}
    for name, field in type(cfg).model_fields.items():
        value = getattr(cfg, name)
        marker = _marker(field)
        if marker is not None and isinstance(value, str):
            parts = value.split(marker.separator) if marker.separator else [value]
            updates[name] = (marker.separator or "").join(resolve_path(p) for p in parts)
        elif isinstance(value, Config):
            updates[name] = resolve_paths(value)
    return cfg.model_copy(update=updates)


def run_dir(run_cfg: RunConfig) -> str:
    """``<storage_path>/<name>``: the run's checkpoints (Ray Train's) and its TensorBoard events."""
    return join(run_cfg.storage_path, run_cfg.name)


def checkpoint_storage(run_cfg: RunConfig) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train; s3:// goes through s3fs with ``run_cfg.s3``."""
    if not run_cfg.storage_path.startswith("s3://"):
        return os.path.abspath(run_cfg.storage_path), None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from labtrain.data import s3

    return run_cfg.storage_path[len("s3://"):], PyFileSystem(FSSpecHandler(s3.filesystem(run_cfg.s3)))


def upload(local_path: str, url: str, s3_cfg: S3Config) -> None:
    """Copy a local file to ``url`` (s3:// through s3fs with ``s3_cfg``, or a local path)."""
    from labtrain.data import s3

    if url.startswith("s3://"):
        s3.with_retries(lambda: s3.filesystem(s3_cfg).put_file(local_path, url), what=url, cfg=s3_cfg)
    else:
        import shutil

        os.makedirs(os.path.dirname(url), exist_ok=True)
        shutil.copyfile(local_path, url)


def write_json(url: str, obj: Any, s3_cfg: S3Config | None = None) -> None:
    """Write ``obj`` as JSON to a local path (atomically: a reader sees all of it or nothing) or an s3:// URL
    (an S3 put is atomic already); s3 on ``s3_cfg``'s store, default: the AWS environment's."""
    import json

    data = json.dumps(obj).encode()
    if url.startswith("s3://"):
        from labtrain.data import s3

        def put() -> None:
            with s3.filesystem(s3_cfg).open(url, "wb") as out:
                out.write(data)

        s3.with_retries(put, what=url, cfg=s3_cfg)
        return
    os.makedirs(os.path.dirname(os.path.abspath(url)), exist_ok=True)
    tmp = f"{url}.tmp"
    with open(tmp, "wb") as out:
        out.write(data)
    os.replace(tmp, url)


def exists(url: str, s3_cfg: S3Config | None = None) -> bool:
    """Whether a local path or s3:// object exists (s3 errors other than a missing object are raised)."""
    if url.startswith("s3://"):
        from labtrain.data import s3

        return s3.with_retries(lambda: s3.filesystem(s3_cfg).exists(url), what=url, cfg=s3_cfg)
    return os.path.exists(url)


def read_json(url: str, s3_cfg: S3Config | None = None) -> Any:
    """The JSON at a local path or s3:// URL; FileNotFoundError when there is none."""
    import json

    if url.startswith("s3://"):
        from labtrain.data import s3

        def get() -> bytes:
            with s3.filesystem(s3_cfg).open(url, "rb") as stream:
                return stream.read()

        return json.loads(s3.with_retries(get, what=url, cfg=s3_cfg))
    with open(url, "rb") as stream:
        return json.loads(stream.read())
