"""What every job's ``__main__`` does: parse the config, refuse a bad one, then hand it to the runner."""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, TypeVar

from labtrain import storage
from labtrain.config import Config, DataConfig, RunConfig, load_config

C = TypeVar("C", bound=Config)


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
    num_models: int = 1,
    shared_parameters: bool = False,
    argv: list[str] | None = None,
    description: str | None = None,
) -> int:
    """``python -m jobs.<kind> --config FILE [key.sub=value ...]``: validate, resolve storage paths, prepare
    (the job's own checks, e.g. that its shards exist), check the data and what the strategy must carry
    (``num_models`` trained models, ``shared_parameters`` between them), run; exit status. Every refusal
    happens here, before Ray starts, with status 2."""
    parser = argparse.ArgumentParser(prog=f"python -m jobs.{kind}", description=description)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    args = parser.parse_args(argv)
    from labtrain.data.stages import DataError
    from labtrain.train.strategies import check_support

    try:
        cfg = storage.resolve_paths(load_config(cls, args.config, args.overrides))
        if prepare is not None:
            cfg = prepare(cfg)
        run_cfg = next(value for _, value in cfg if isinstance(value, RunConfig))
        check_support(run_cfg, num_models=num_models, shared_parameters=shared_parameters)
        check_data(cfg, run_cfg)
    except (ValueError, DataError) as error:  # ConfigError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 2

    from labtrain.train import run

    if run_cfg.tensorboard:
        print(f"TensorBoard: tensorboard --logdir {storage.join(storage.run_dir(run_cfg), 'tensorboard')} (or the storage root for every run)", flush=True)
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
