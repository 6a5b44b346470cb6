"""What every job's ``__main__`` does: parse the config, refuse a bad one, then hand it to the runner."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, TypeVar

from labtrain.config import Config, ConfigError, DataConfig, RunConfig, load_config
from labtrain.data.index import expand_urls

C = TypeVar("C", bound=Config)


STORAGE_ROOT_ENV = "LABTRAIN_STORAGE_ROOT"


def storage_root() -> str:
    """Where relative data and checkpoint paths live: ``$LABTRAIN_STORAGE_ROOT`` (a shared filesystem
    path or s3://bucket/prefix; the local cluster sets it to the repo's runs/), else ./runs."""
    return os.environ.get(STORAGE_ROOT_ENV) or os.path.abspath("runs")


def resolve_path(path: str) -> str:
    """``path`` as every worker must see it: URLs and absolute paths as they are, others under the storage root."""
    if "://" in path or os.path.isabs(path):
        return path
    root = storage_root()
    return f"{root.rstrip('/')}/{path}" if "://" in root else os.path.join(root, path)


def resolve_local_paths(cfg: C) -> C:
    """Relative data and storage paths put under the storage root, so that every worker, whatever its
    working directory (a Ray job's working_dir copy is private to it), reads and writes the same files."""
    updates = {}
    for name, value in cfg:
        if isinstance(value, DataConfig):
            index = resolve_path(value.index) if value.index else None
            updates[name] = value.model_copy(update={"urls": "::".join(resolve_path(p) for p in value.urls.split("::")), "index": index})
        elif isinstance(value, RunConfig):
            updates[name] = value.model_copy(update={"storage_path": resolve_path(value.storage_path)})
    return cfg.model_copy(update=updates)


def local_shards_missing(urls: str) -> bool:
    """True when ``urls`` names local shards and none of them exists yet."""
    if "://" in urls:
        return False
    return not any(os.path.exists(u) for u in expand_urls(urls))


def check_data(cfg: Config, run_cfg: RunConfig) -> None:
    """Refuse, before any Ray worker starts, data the workers could not use: shards without an index, or
    too few samples per rank for one batch (inside a run these would fail and be restarted in vain). A
    DataStream for rank 0 makes exactly the checks every worker's will."""
    from labtrain.data import DataStream

    for _, value in cfg:
        if isinstance(value, DataConfig):
            DataStream(value, rank=0, world_size=max(run_cfg.num_workers, 1))


def job_main(
    cls: type[C],
    train_fn: Callable,
    *,
    kind: str,
    prepare: Callable[[C], C] | None = None,
    report: Callable[[C, Any], None] | None = None,
    argv: list[str] | None = None,
    description: str | None = None,
) -> int:
    """``python -m jobs.<kind> --config FILE [key.sub=value ...]``: validate, prepare, run; exit status."""
    parser = argparse.ArgumentParser(prog=f"python -m jobs.{kind}", description=description)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(cls, args.config, args.overrides)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if prepare is not None:
        cfg = prepare(cfg)
    run_cfg = next(value for _, value in cfg if isinstance(value, RunConfig))
    from labtrain.data.stages import DataError

    try:
        check_data(cfg, run_cfg)
    except (ValueError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2

    from labtrain.train import run

    result = run(train_fn, cfg, run_cfg, kind=kind)
    if result.error is not None:
        print(f"error: the run failed: {result.error}", file=sys.stderr)
        return 1
    if report is not None:
        report(cfg, result)
    else:
        print(f"done: {result.metrics}")
    if result.checkpoint is not None:
        print(f"latest checkpoint: {result.checkpoint.path}")
    return 0
