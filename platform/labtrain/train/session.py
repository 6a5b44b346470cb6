"""What a training function sees on each worker: prepare, backward, batches, log, checkpoint, restore.

A job's ``train(session, cfg)`` reads top to bottom, and steps its optimizers itself::

    model, optimizer, scheduler = session.prepare(model, optimizer, scheduler)
    data = session.data(cfg.data)
    step = session.restore(data).step            # 0 on a fresh run
    session.total_steps = total                  # for the progress line's percentage and ETA
    while data.epoch < cfg.epochs:
        for batch in session.batches(data):
            loss = ...
            session.backward(loss, model=model)
            optimizer.step()
            optimizer.zero_grad()
            scheduler.step()
            step += 1
            session.log(step, loss=loss)
            if step % every == 0:
                session.checkpoint(step, data)

Several models: ``(g, g_opt), (d, d_opt, d_sched) = session.prepare((g, g_opt), (d, d_opt, d_sched))``; a
model given without an optimizer (an EMA copy) is moved to the device and checkpointed, never wrapped.

The run's options act inside this API, the same under every strategy: ``run.precision=bf16`` runs each
prepared model's forward under autocast; ``run.clip_grad_norm`` clips in ``optimizer.step()``;
``run.accumulate_batches=N`` makes ``optimizer.step()``, ``zero_grad()`` and ``scheduler.step()`` act on
every N-th batch only, and ``backward`` skip the gradient all-reduce on the batches in between.

A checkpoint holds the strategy's state (models, optimizers), the schedulers and carried models, and per
rank the step, the RNG states (CUDA's too), the data position and anything the job adds under ``extra``, so a
restart continues the same run.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import random
import signal
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
import ray.train
import torch
from torch import nn

from labtrain import dist, storage
from labtrain.config import DataConfig, RunConfig
from labtrain.data import DataStream
from labtrain.metrics import TrainMetrics
from labtrain.train.logger import RunLogger
from labtrain.train.strategies import Prepared, make_strategy

log = logging.getLogger(__name__)


@dataclass
class Restored:
    step: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    resumed: bool = False


def _seed_per_rank(rank: int) -> None:
    """After the models exist (built alike on every rank from the job's seed), give each rank its own random
    stream, derived from that seed: dropout, DropToken and augmentation masks differ across ranks instead of
    repeating on each; every device's generator included. A resumed run then takes each rank's saved state."""
    seed = (torch.initial_seed() * 1_000_003 + rank) % 2**63
    torch.manual_seed(seed)  # CPU and every CUDA device
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _num_samples(batch: Any, default: int) -> int:
    """Samples in a batch: its keys, or the length of its first tensor."""
    if isinstance(batch, dict):
        if "__key__" in batch:
            return len(batch["__key__"])
        batch = next(iter(batch.values()), None)
    if isinstance(batch, (tuple, list)) and batch:
        batch = batch[0]
    return len(batch) if torch.is_tensor(batch) and batch.dim() > 0 else default


class StepOptimizer:
    """The optimizer a job steps: the strategy's, acting only on the batch that ends an optimizer step
    (every ``run.accumulate_batches``-th), with gradient clipping before the step."""

    def __init__(self, session: "Session", entry: Prepared):
        self._session, self._entry = session, entry

    def step(self) -> None:
        if self._session.accumulating:
            return
        self._session.strategy.clip(self._entry)
        self._session.strategy.optimizer_step(self._entry)

    def zero_grad(self, set_to_none: bool = True) -> None:
        del set_to_none  # always: gradients are freed, not zero-filled
        if not self._session.accumulating:
            self._session.strategy.zero_grad(self._entry)

    @property
    def param_groups(self) -> list[dict]:
        return self._entry.optimizer.param_groups

    def __getattr__(self, name: str) -> Any:  # state_dict(), state, ...: the strategy's optimizer
        return getattr(self._entry.optimizer, name)


class StepScheduler:
    """The job's scheduler, stepped with its optimizer (on the batches that end an optimizer step)."""

    def __init__(self, session: "Session", scheduler: Any):
        self._session, self._scheduler = session, scheduler

    def step(self) -> None:
        if not self._session.accumulating:
            self._scheduler.step()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._scheduler, name)


def drill_marker(cfg: RunConfig) -> str:
    """The file in this node's temp folder that says run.kill_worker_at_step's drill already happened in this run
    (by run name and storage path), so that the restarted worker does not kill itself again."""
    digest = hashlib.sha1(f"{storage.run_dir(cfg)}".encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), f"labtrain-drill-{cfg.name}-{digest}")


class Session:
    """One worker's handle on the run: strategy, logger, metrics and checkpoints."""

    def __init__(self, run_cfg: RunConfig, *, kind: str):
        self.cfg = run_cfg
        self.kind = kind
        self.rank = dist.rank()
        self.world_size = dist.world_size()
        self.strategy = make_strategy(run_cfg)
        self.device = self.strategy.device
        self.metrics = TrainMetrics(job=run_cfg.name, kind=kind, rank=self.rank)
        self.logger = RunLogger(run_cfg, rank=self.rank, world_size=self.world_size, kind=kind, metrics=self.metrics)
        self._entries: dict[int, Prepared] = {}  # id() of anything the job may pass as model= -> its entry
        self._batches_seen = 0
        self._batches_at_start = 0  # _batches_seen when this attempt began (restore sets both)
        self._epoch: int | None = None
        self._last_scalars: dict[str, float] = {}
        self._streams: list[DataStream] = []

    @property
    def total_steps(self) -> int | None:
        return self.logger.total_steps

    @total_steps.setter
    def total_steps(self, value: int) -> None:
        self.logger.total_steps = value

    # -- models --------------------------------------------------------------------------------
    def prepare(self, *items):
        """Wrap models for the strategy. ``prepare(model, optimizer, scheduler=None)`` returns that triple;
        ``prepare((m1, o1), (m2, o2, s2), (ema, None))`` returns one tuple per argument, in order. Use what
        it returns from now on. Call it once, with every model the run trains or carries."""
        if self.strategy.entries:
            raise RuntimeError("session.prepare was already called; prepare every model in one call")
        single = isinstance(items[0], nn.Module)
        groups = [items] if single else list(items)
        triples = []
        for group in groups:
            if not isinstance(group, (tuple, list)) or not 1 <= len(group) <= 3 or not isinstance(group[0], nn.Module):
                raise TypeError(f"session.prepare takes (model, optimizer[, scheduler]) groups; got {type(group).__name__}")
            triples.append((tuple(group) + (None, None))[:3])
        entries = self.strategy.prepare(triples)
        _seed_per_rank(self.rank)
        results = []
        for group, entry in zip(groups, entries):
            for obj in (entry.model, entry.module, entry.wrapped, group[0]):
                if obj is not None:
                    self._entries[id(obj)] = entry
            optimizer = StepOptimizer(self, entry) if entry.trained else None
            scheduler = StepScheduler(self, entry.scheduler) if entry.scheduler is not None else None
            results.append((entry.model, optimizer, scheduler)[: len(group)])
        return results[0] if single else results

    def _entry(self, model: nn.Module | None) -> Prepared:
        if model is None:
            trained = [e for e in self.strategy.entries if e.trained]
            if len(trained) != 1:
                raise ValueError(f"this run prepared {len(trained)} trained models: name the one meant with model=")
            return trained[0]
        entry = self._entries.get(id(model))
        if entry is None:
            raise ValueError(f"{type(model).__name__} was not prepared by this session; pass what session.prepare returned")
        return entry

    def backward(self, loss: torch.Tensor, *, model: nn.Module | None = None) -> None:
        """Backpropagate ``loss`` into ``model``'s gradients (scaled by 1/run.accumulate_batches); the
        gradients are all-reduced only on the batch that ends an optimizer step."""
        entry = self._entry(model)
        if not entry.trained:
            raise ValueError(f"model {entry.index} was prepared without an optimizer; it has no gradients to compute")
        self.strategy.backward(loss, entry)

    @property
    def accumulating(self) -> bool:
        """True on a batch whose gradients are only accumulated (no optimizer step ends on it)."""
        n = self.cfg.accumulate_batches
        return n > 1 and self._batches_seen % n != 0

    def unwrap(self, model: nn.Module | None = None) -> nn.Module:
        """The plain module (no DDP/DeepSpeed/Accelerate/autocast wrapper), e.g. for evaluation."""
        return self._entry(model).module

    # -- data ----------------------------------------------------------------------------------
    def data(self, cfg: DataConfig, **kwargs) -> DataStream:
        """This rank's stream of ``cfg``, counting bad data in this worker's metrics."""
        kwargs.setdefault("pin_memory", self.device.type == "cuda")
        stream = DataStream(cfg, rank=self.rank, world_size=self.world_size, metrics=self.metrics, **kwargs)
        self._streams.append(stream)
        return stream

    def batches(self, data: DataStream | Iterable) -> Iterator[Any]:
        """The batches of ``data`` (a DataStream's epoch, or any iterable of batches). Records each batch's
        data wait and step time (from its arrival to the request for the next one), samples and steps, and
        counts batches for ``run.accumulate_batches``."""
        self._epoch = getattr(data, "epoch", None)
        if self._epoch is not None:
            self.metrics.set_epoch(self._epoch)
        default_size = data.cfg.batch_size if isinstance(data, DataStream) else 0
        iterator = iter(data)
        ready_at = wait_s = num_samples = None
        while True:
            start = time.perf_counter()
            if ready_at is not None:
                self._batch_done(num_samples, start - ready_at, wait_s)
            try:
                batch = next(iterator)
            except StopIteration:
                return
            ready_at = time.perf_counter()
            wait_s = ready_at - start
            if self._batches_seen == self._batches_at_start:
                self.logger.start()
            num_samples = _num_samples(batch, default_size)
            self.logger.batch_ready(num_samples=num_samples)
            self._batches_seen += 1
            self.strategy.set_gradient_sync(not self.accumulating)
            yield batch

    def _batch_done(self, num_samples: int, step_s: float, wait_s: float) -> None:
        self.metrics.batch(num_samples=num_samples, step_s=step_s, data_wait_s=wait_s)
        self.logger.batch_done(step_s=step_s, data_wait_s=wait_s)

    # -- logging -------------------------------------------------------------------------------
    def log(self, step: int, **scalars: Any) -> None:
        """This step's scalars (tensors or numbers: ``loss`` and the job's own signals). Every
        ``run.log_every`` steps they become a progress line and TensorBoard points (rank 0) and
        Prometheus gauges (every rank); tensors are read only then."""
        self.logger.log(step, epoch=self._epoch, lrs=self._learning_rates, scalars=scalars)
        self._last_scalars = scalars
        if step == self.cfg.kill_worker_at_step and self.rank == self.world_size - 1:
            self._fault_drill(step)

    def _fault_drill(self, step: int) -> None:
        """run.kill_worker_at_step: die the way a lost node dies (SIGKILL, no cleanup), once per run."""
        marker = drill_marker(self.cfg)
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return  # the drill already happened; this is the restarted run
        os.close(fd)
        log.warning("fault drill (run.kill_worker_at_step=%d): rank %d kills itself", step, self.rank)
        os.kill(os.getpid(), signal.SIGKILL)

    def _learning_rates(self) -> list[float]:
        return [float(e.optimizer.param_groups[0]["lr"]) for e in self.strategy.entries if e.trained]

    def log_image(self, step: int, tag: str, image_CHW: torch.Tensor) -> None:
        """An image (C, H, W) in [0, 1], e.g. a grid of samples, in TensorBoard (rank 0)."""
        self.logger.image(step, tag, image_CHW)

    def info(self, message: str, *args: Any) -> None:
        """A line in the job's log, written once (by rank 0)."""
        self.logger.info(message, *args)

    def finished(self) -> None:
        """The job function returned: the run is over, so a fault drill's marker (which outlived the killed worker
        so that its restart would not drill again) is removed from this node's temp folder."""
        if self.cfg.kill_worker_at_step is not None:
            with contextlib.suppress(FileNotFoundError):
                os.remove(drill_marker(self.cfg))

    def close(self) -> None:
        """The end of this worker's run: say what data was lost (every rank that lost some), close the logger."""
        for stream in self._streams:
            if stream.skipped_samples or stream.bad_shards:
                read = stream.samples_per_epoch * max(stream.epoch, 1)
                log.warning(
                    "rank %d: %d samples (%.1f%% of the %d it read) were lost (unreadable shards, samples that failed to decode) and "
                    "filled with other samples; "
                    "%d unreadable shards (data.max_bad_shards=%d): %s",
                    self.rank, stream.skipped_samples, 100 * stream.skipped_samples / max(read, 1), read,
                    len(stream.bad_shards), stream.cfg.max_bad_shards, ", ".join(sorted(stream.bad_shards)) or "none",
                )
        self.logger.close()

    # -- checkpoints ---------------------------------------------------------------------------
    def checkpoint(self, step: int, data: DataStream | None = None, *, extra: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None) -> None:
        """Save everything needed to continue from here and report it to Ray Train (all ranks call this)."""
        with self.metrics.time_checkpoint(), tempfile.TemporaryDirectory(prefix="labtrain-ckpt-") as path:
            self.strategy.save(path)
            if self.rank == 0:
                entries = self.strategy.entries
                torch.save({
                    "schedulers": [e.scheduler.state_dict() if e.scheduler is not None else None for e in entries],
                    "carried": [None if e.trained else e.module.state_dict() for e in entries],
                }, os.path.join(path, "session.pt"))
            rank_state = {
                "step": step,
                "batches_seen": self._batches_seen,
                "rng": _rng_state(),
                "data": data.state_dict() if data is not None else None,
                "extra": extra or {},
                "world_size": self.world_size,
            }
            torch.save(rank_state, os.path.join(path, f"rank-{self.rank:05d}.pt"))
            dist.barrier()
            last = {name: float(value.detach()) if torch.is_tensor(value) else value for name, value in self._last_scalars.items()}
            report = {"step": step, **last, **(metrics or {})}
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(path))
        self.info("checkpoint at step %d (%s)", step, storage.run_dir(self.cfg))

    def report(self, metrics: dict[str, Any]) -> None:
        """Report metrics without a checkpoint (all ranks call this)."""
        ray.train.report(metrics)

    def restore(self, data: DataStream | None = None) -> Restored:
        """Load the latest checkpoint of this run, if any, into the prepared models and ``data``."""
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return Restored()
        with checkpoint.as_directory() as path:
            rank_file = os.path.join(path, f"rank-{self.rank:05d}.pt")
            if not os.path.exists(rank_file):
                raise RuntimeError(f"checkpoint {checkpoint.path} has no state for rank {self.rank}; it was written by a run with a different number of workers")
            state = torch.load(rank_file, weights_only=False)
            self.strategy.load(path)
            shared = torch.load(os.path.join(path, "session.pt"), map_location=self.device, weights_only=False)
        for entry, scheduler_state, carried_state in zip(self.strategy.entries, shared["schedulers"], shared["carried"]):
            if entry.scheduler is not None:
                entry.scheduler.load_state_dict(scheduler_state)
            if carried_state is not None:
                entry.module.load_state_dict(carried_state)
        _set_rng_state(state["rng"])
        self._batches_seen = self._batches_at_start = state["batches_seen"]
        if data is not None and state["data"] is not None:
            data.load_state_dict(state["data"])
        self.info("resumed from %s at step %d", checkpoint.path, state["step"])
        return Restored(step=state["step"], extra=state["extra"], resumed=True)
