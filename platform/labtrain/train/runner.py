"""``run(train_fn, job_cfg, run_cfg)``: a training function on Ray Train's TorchTrainer.

The driver side: resources, failure handling and checkpoint storage from :class:`~labtrain.config.RunConfig`.
On each worker the function is called as ``train_fn(session, job_cfg)`` with a
:class:`~labtrain.train.session.Session`.
"""

from __future__ import annotations

import os
from typing import Any, Callable

from ray.train import CheckpointConfig, FailureConfig, Result, RunConfig as RayRunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer

from labtrain.config import Config, RunConfig
from labtrain.train.session import Session

TrainFn = Callable[[Session, Any], Any]

# Passed on to every worker when set here: where DeepSpeed caches its compiled ops.
_PROPAGATED_ENV = ("TORCH_EXTENSIONS_DIR",)


def _worker_main(payload: dict[str, Any]) -> None:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    session = Session(payload["run"], kind=payload["kind"])
    payload["fn"](session, payload["job"])


def storage(cfg: RunConfig) -> tuple[str, Any]:
    """(storage_path, storage_filesystem) for Ray Train; s3:// goes through s3fs with labtrain's settings."""
    if not cfg.storage_path.startswith("s3://"):
        return os.path.abspath(cfg.storage_path), None
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    from labtrain.data import s3

    s3.configure(cfg.s3)
    return cfg.storage_path[len("s3://"):], PyFileSystem(FSSpecHandler(s3.filesystem()))


def worker_env(cfg: RunConfig) -> dict[str, str]:
    env = {name: os.environ[name] for name in _PROPAGATED_ENV if name in os.environ}
    if cfg.gpus_per_worker == 0:
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed would look for CUDA otherwise
    return env


def make_trainer(train_fn: TrainFn, job_cfg: Config, run_cfg: RunConfig, *, kind: str) -> TorchTrainer:
    storage_path, storage_filesystem = storage(run_cfg)
    resources = {"CPU": run_cfg.cpus_per_worker, **run_cfg.resources_per_worker}
    if run_cfg.gpus_per_worker:
        resources["GPU"] = run_cfg.gpus_per_worker
    return TorchTrainer(
        _worker_main,
        train_loop_config={"fn": train_fn, "job": job_cfg, "run": run_cfg, "kind": kind},
        torch_config=TorchConfig(backend="nccl" if run_cfg.gpus_per_worker else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=run_cfg.num_workers,
            use_gpu=run_cfg.gpus_per_worker > 0,
            resources_per_worker=resources,
        ),
        run_config=RayRunConfig(
            name=run_cfg.name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=FailureConfig(max_failures=run_cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=run_cfg.num_to_keep),
            worker_runtime_env={"env_vars": worker_env(run_cfg)},
        ),
    )


def run(train_fn: TrainFn, job_cfg: Config, run_cfg: RunConfig, *, kind: str) -> Result:
    """Run ``train_fn(session, job_cfg)`` on ``run_cfg.num_workers`` Ray Train workers until it returns.

    A run with the same ``name`` and ``storage_path`` as an earlier one continues from its latest
    checkpoint; a worker failure restarts all workers from it, up to ``max_failures`` times.
    """
    return make_trainer(train_fn, job_cfg, run_cfg, kind=kind).fit()
