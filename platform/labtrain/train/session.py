"""What a training function sees on each worker: prepare, step, batches, checkpoint, restore.

A job's ``train(session, cfg)`` reads top to bottom::

    model, optimizer, scheduler = session.prepare(model, optimizer, scheduler, batch_size=B)
    data = session.data(cfg.data)
    step = session.restore(data).step            # 0 on a fresh run
    while data.epoch < cfg.epochs:
        for batch in session.batches(data):
            loss = ...
            session.step(loss, num_samples=B)
            step += 1
            if step % every == 0:
                session.checkpoint(step, data)

A checkpoint holds the strategy's state (model, optimizer, scheduler), and per rank the step, the RNG
states, the data position and anything the job adds under ``extra``, so a restart continues the same run.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import ray.train
import torch

from labtrain import dist
from labtrain.config import DataConfig, RunConfig
from labtrain.data import DataStream
from labtrain.metrics import TrainMetrics
from labtrain.train.strategies import make_strategy

log = logging.getLogger(__name__)


@dataclass
class Restored:
    step: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    resumed: bool = False


def _rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


class Session:
    """One worker's handle on the run: strategy, metrics and checkpoints."""

    def __init__(self, run_cfg: RunConfig, *, kind: str):
        self.cfg = run_cfg
        self.kind = kind
        self.rank = dist.rank()
        self.world_size = dist.world_size()
        self.strategy = make_strategy(run_cfg)
        self.metrics = TrainMetrics(job=run_cfg.name, kind=kind, rank=self.rank)
        self.device = torch.device("cpu")
        self._optimizer = None
        self._batch_ready_at: float | None = None
        self._last_wait_s = 0.0
        self.last_metrics: dict[str, float] = {}

    # -- model ---------------------------------------------------------------------------------
    def prepare(self, model, optimizer, scheduler=None, *, batch_size: int):
        """Wrap for the configured strategy; returns (model, optimizer, scheduler) to use from now on."""
        from labtrain.train.strategies import device

        self.device = device()
        model, self._optimizer, scheduler = self.strategy.prepare(model, optimizer, scheduler, batch_size=batch_size)
        return model, self._optimizer, scheduler

    def unwrap(self) -> torch.nn.Module:
        """The plain module (no DDP/DeepSpeed/Accelerate wrapper), e.g. for evaluation."""
        return self.strategy.unwrap()

    # -- data ----------------------------------------------------------------------------------
    def data(self, cfg: DataConfig, **kwargs) -> DataStream:
        """This rank's stream of ``cfg``, counting bad data in this worker's metrics."""
        return DataStream(cfg, rank=self.rank, world_size=self.world_size, metrics=self.metrics, **kwargs)

    def batches(self, data: DataStream) -> Iterator[Any]:
        """The epoch's batches, timing how long each one was waited for."""
        self.metrics.set_epoch(data.epoch)
        iterator = iter(data)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self._batch_ready_at = time.perf_counter()
            self._last_wait_s = self._batch_ready_at - start
            yield batch

    def step(self, loss: torch.Tensor, *, num_samples: int) -> float:
        """Backward and optimizer step for ``loss``; records step metrics. Returns the loss value."""
        self.strategy.step(loss)
        value = float(loss.detach())
        now = time.perf_counter()
        step_s = now - (self._batch_ready_at or now)
        lr = float(self._optimizer.param_groups[0]["lr"])
        self.metrics.step(num_samples=num_samples, step_s=step_s, data_wait_s=self._last_wait_s, loss=value, lr=lr)
        self.last_metrics = {"loss": value, "step_s": step_s, "data_wait_s": self._last_wait_s}
        return value

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoint(self, step: int, data: DataStream | None = None, *, extra: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None) -> None:
        """Save everything needed to continue from here and report it to Ray Train (all ranks call this)."""
        with self.metrics.time_checkpoint(), tempfile.TemporaryDirectory(prefix="labtrain-ckpt-") as path:
            self.strategy.save(path)
            rank_state = {
                "step": step,
                "rng": _rng_state(),
                "data": data.state_dict() if data is not None else None,
                "extra": extra or {},
                "world_size": self.world_size,
            }
            torch.save(rank_state, os.path.join(path, f"rank-{self.rank:05d}.pt"))
            dist.barrier()
            report = {"step": step, **self.last_metrics, **(metrics or {})}
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(path))

    def report(self, metrics: dict[str, Any]) -> None:
        """Report metrics without a checkpoint (all ranks call this)."""
        ray.train.report(metrics)

    def restore(self, data: DataStream | None = None) -> Restored:
        """Load the latest checkpoint of this run, if any, into the prepared model and ``data``."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return Restored()
        with checkpoint.as_directory() as path:
            rank_file = os.path.join(path, f"rank-{self.rank:05d}.pt")
            if not os.path.exists(rank_file):
                raise RuntimeError(f"checkpoint {checkpoint.path} has no state for rank {self.rank}; it was written by a run with a different number of workers")
            state = torch.load(rank_file, weights_only=False)
            self.strategy.load(path)
        _set_rng_state(state["rng"])
        if data is not None and state["data"] is not None:
            data.load_state_dict(state["data"])
        if self.rank == 0:
            log.info("resumed from %s at step %d", checkpoint.path, state["step"])
        return Restored(step=state["step"], extra=state["extra"], resumed=True)
