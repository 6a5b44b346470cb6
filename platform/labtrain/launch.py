"""What every job's ``__main__`` does: parse the config, refuse a bad one, then hand it to the runner."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, TypeVar

from labtrain.config import Config, ConfigError, DataConfig, RunConfig, load_config
from labtrain.data.index import expand_urls

C = TypeVar("C", bound=Config)


def _absolute(path: str) -> str:
    return path if "://" in path or os.path.isabs(path) else os.path.abspath(path)


def resolve_local_paths(cfg: C) -> C:
    """Relative local data and storage paths made absolute here, so workers started in another working
    directory (Ray workers, other nodes on a shared filesystem) read and write the same files."""
    updates = {}
    for name, value in cfg:
        if isinstance(value, DataConfig):
            index = _absolute(value.index) if value.index else None
            updates[name] = value.model_copy(update={"urls": "::".join(_absolute(p) for p in value.urls.split("::")), "index": index})
        elif isinstance(value, RunConfig):
            updates[name] = value.model_copy(update={"storage_path": _absolute(value.storage_path)})
    return cfg.model_copy(update=updates)


def local_shards_missing(urls: str) -> bool:
    """True when ``urls`` names local shards and none of them exists yet."""
    if "://" in urls:
        return False
    return not any(os.path.exists(u) for u in expand_urls(urls))


def job_main(
    cls: type[C],
    train_fn: Callable,
    *,
    kind: str,
    prepare: Callable[[C], C] | None = None,
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

    from labtrain.train import run

    run_cfg = next(value for _, value in cfg if isinstance(value, RunConfig))
    result = run(train_fn, cfg, run_cfg, kind=kind)
    if result.error is not None:
        print(f"error: the run failed: {result.error}", file=sys.stderr)
        return 1
    print(f"done: {result.metrics}")
    if result.checkpoint is not None:
        print(f"latest checkpoint: {result.checkpoint.path}")
    return 0
