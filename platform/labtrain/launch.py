"""What every job's ``__main__`` does: parse the config, refuse a bad one, then hand it to the runner.

Every job's command line is also the contract with the lab queue: ``--config FILE [key.sub=value ...]``, the
gang the queue admitted (``--workers``, ``--cpus-per-worker``, ``--gpus-per-worker``, ``--memory-gb-per-worker``),
a default ``--name`` (the queue's job id) and ``--check``, which validates everything that can be validated
without the data and starts nothing. Each job maps the gang onto its own config: a Ray Train job onto
``run.*`` (:func:`gang_overrides`), the NAS search onto its trials.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Callable, TypeVar

from labtrain import storage
from labtrain.config import Config, DataConfig, RunConfig, load_config

C = TypeVar("C", bound=Config)


def job_arguments(prog: str, description: str | None) -> argparse.ArgumentParser:
    """The command line every job takes (see the module docstring)."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")
    gang = parser.add_argument_group("the gang (what the lab queue admitted; each job maps it onto its config)")
    gang.add_argument("--workers", type=int, default=None, help="workers, or concurrent trials")
    gang.add_argument("--cpus-per-worker", type=float, default=None)
    gang.add_argument("--gpus-per-worker", type=float, default=None)
    gang.add_argument("--memory-gb-per-worker", type=float, default=None)
    gang.add_argument("--name", default=None, help="the run's name unless an override sets it (the queue passes its job id)")
    parser.add_argument("--check", action="store_true", help="validate the config, overrides and gang, start nothing; exit 0 or 2")
    parser.add_argument("--plan", metavar="NODE", default=None,
                        help="print what the run needs of one node shaped cpus=32,memory=240Gi,shm=64Gi,gpus=8,object_store=50G "
                             "(CPUs, memory, /dev/shm: labtrain.sizing), start nothing; exit 0 if it fits, 2 if not")
    parser.add_argument("--done-file", default=None, help="written when the run completes (the queue reads it to never run a finished job again)")
    return parser


def mark_done(args: argparse.Namespace) -> None:
    """Record that this run completed where the queue asked (``--done-file``: a path the queue's service can
    read, or an s3:// URL on the AWS environment's store), so the queue never runs it again."""
    if not args.done_file:
        return
    import time

    from labtrain import storage

    storage.write_json(args.done_file, {"name": args.name, "config": args.config, "completed_at": time.time()})


# Where each part of the gang goes in a Ray Train job's config (other jobs pass their own map).
TRAINER_GANG = {"workers": "run.num_workers", "cpus_per_worker": "run.cpus_per_worker", "gpus_per_worker": "run.gpus_per_worker",
                "memory_gb_per_worker": "run.resources_per_worker", "name": "run.name"}


def gang_flags(workers: int, cpus_per_worker: float, gpus_per_worker: float, memory_gb_per_worker: float | None) -> list[str]:
    """The gang as the command-line flags of :func:`job_arguments` (what the queue and ``labtrain submit`` pass)."""
    flags = ["--workers", str(workers), "--cpus-per-worker", f"{cpus_per_worker:g}", "--gpus-per-worker", f"{gpus_per_worker:g}"]
    if memory_gb_per_worker:
        flags += ["--memory-gb-per-worker", f"{memory_gb_per_worker:g}"]
    return flags


def gang_overrides(args: argparse.Namespace, fields: dict[str, str] = TRAINER_GANG) -> list[str]:
    """The user's overrides, then the gang of ``args`` as overrides of ``fields`` (so it wins); the name only
    when the user did not set it."""
    extra = [f"{fields[arg]}={getattr(args, arg):g}" for arg in ("workers", "cpus_per_worker", "gpus_per_worker") if getattr(args, arg) is not None]
    if args.memory_gb_per_worker is not None:
        extra.append(f"{fields['memory_gb_per_worker']}={{memory: {int(args.memory_gb_per_worker * 2**30)}}}")
    if args.name is not None and not any(o.startswith(fields["name"] + "=") for o in args.overrides):
        extra.append(f"{fields['name']}={args.name}")
    return [*args.overrides, *extra]


def _last_line(error: BaseException) -> str:
    """An exception as one line: Ray Train's errors carry the worker's whole traceback, whose last line says what."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def check_data(cfg: Config, run_cfg: RunConfig) -> None:
    """Refuse, before any Ray worker starts, data the workers could not use: shards without an index, or
    too few samples per rank for one batch (inside a run these would fail and be restarted in vain). A
    DataStream for rank 0 makes exactly the checks every worker's will."""
    from labtrain.data import DataStream

    for _, value in cfg:
        if isinstance(value, DataConfig):
            DataStream(value, rank=0, world_size=max(run_cfg.num_workers, 1))


def print_plan(cfg: Config, node_text: str) -> int:
    """``--plan``: the run's needs of one node (labtrain.sizing). A sample's bytes come from the config's own
    ``sample_bytes()`` (as stored, as collated) where the job defines it, else from the shard index."""
    from labtrain import sizing
    from labtrain.data.index import load_shards

    node = sizing.NodeShape.parse(node_text)
    run_cfg = next(value for _, value in cfg if isinstance(value, RunConfig))
    data_cfg = next(value for _, value in cfg if isinstance(value, DataConfig))
    if hasattr(cfg, "sample_bytes"):
        stored, collated = cfg.sample_bytes()
        source = "from the model's sizes"
    else:
        shards = load_shards(data_cfg.urls, data_cfg.index, data_cfg.s3)
        stored = collated = sum(s.size_bytes for s in shards) / max(sum(s.num_samples for s in shards), 1)
        source = f"the mean of {len(shards)} shards in the index"
    plan = sizing.node_plan(data_cfg, run_cfg, node, stored_bytes=stored, batch_bytes_per_sample=collated)
    print(f"one sample: {stored / 2**20:.2f} MiB as stored, {collated / 2**20:.2f} MiB collated ({source})")
    print("\n".join(plan.lines(node)), flush=True)
    return 2 if plan.problems else 0


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
    args = job_arguments(f"python -m jobs.{kind}", description).parse_args(argv)
    from labtrain.data.stages import DataError
    from labtrain.train.strategies import check_support

    try:
        cfg = storage.resolve_paths(load_config(cls, args.config, gang_overrides(args)))
        if args.plan:
            return print_plan(cfg, args.plan)
        if args.check:  # what can be refused without the data (the queue's submit-time check)
            run_cfg = next(value for _, value in cfg if isinstance(value, RunConfig))
            check_support(run_cfg, num_models=num_models, shared_parameters=shared_parameters)
            print(f"ok: {cls.__name__} from {args.config} is valid", flush=True)
            return 0
        if prepare is not None:
            cfg = prepare(cfg)
        run_cfg = next(value for _, value in cfg if isinstance(value, RunConfig))
        check_support(run_cfg, num_models=num_models, shared_parameters=shared_parameters)
        check_data(cfg, run_cfg)
    except (ValueError, DataError) as error:  # ConfigError is a ValueError
        print(f"error: {error}", file=sys.stderr)
        return 2

    from ray.train import TrainingFailedError

    from labtrain.train import run
    from labtrain.train.runner import GangDoesNotFitError, RunStartError

    tensorboard_dir = storage.join(storage.run_dir(run_cfg), "tensorboard")
    if run_cfg.tensorboard:
        print(f"TensorBoard: tensorboard --logdir {tensorboard_dir} (or the storage root for every run)", flush=True)
    if args.done_file:  # started by the queue: say where this run's curves are, for its page
        from labtrain.queue.curves import run_record_file

        try:
            storage.write_json(run_record_file(args.done_file), {"name": args.name, "run_dir": storage.run_dir(run_cfg),
                                                                  "tensorboard": tensorboard_dir if run_cfg.tensorboard else None})
        except Exception as error:  # noqa: BLE001 - the page then has no curves; the run goes on
            print(f"warning: cannot write the run record beside {args.done_file}: {error}", file=sys.stderr)
    try:
        result = run(train_fn, cfg, run_cfg, kind=kind)
        error = result.error
    except (TrainingFailedError, RunStartError) as raised:  # Ray Train raises a worker's failure from fit()
        error = raised
    if isinstance(error, GangDoesNotFitError):  # refused before anything started
        print(f"error: {error}", file=sys.stderr)
        return 2
    if error is not None:
        print(f"error: the run failed: {_last_line(error)} (the workers' tracebacks are above)", file=sys.stderr)
        return 1
    if report is not None:
        report(cfg, result)
    else:
        print(f"done: {result.metrics}")
    if result.checkpoint is not None:
        print(f"latest checkpoint: {result.checkpoint.path}")
    mark_done(args)
    return 0
