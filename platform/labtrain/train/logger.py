"""What a person watches: one progress line per interval, TensorBoard scalars and images, Prometheus gauges.

Every rank keeps its Prometheus values (a scrape sees each rank); only rank 0 prints and writes TensorBoard,
so jobs never test ``rank == 0`` themselves. Scalars may be tensors: they are read (a device sync) only on
the steps that are shown, every ``run.log_every`` steps.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import tempfile
import time
from typing import Any, Callable

import torch

from labtrain import storage
from labtrain.config import RunConfig
from labtrain.metrics import TrainMetrics

progress_log = logging.getLogger("labtrain.progress")

# Upload TensorBoard events to s3:// at most this often (and when the run closes).
UPLOAD_EVERY_S = 30.0


def _number(value: Any) -> float:
    return float(value.detach()) if torch.is_tensor(value) else float(value)


def _eta(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class RunLogger:
    """The session's logger: ``log(step, **scalars)`` every step, shown every ``log_every`` steps."""

    def __init__(self, cfg: RunConfig, *, rank: int, world_size: int, kind: str, metrics: TrainMetrics):
        self.cfg = cfg
        self.rank = rank
        self.world_size = world_size
        self.kind = kind
        self.metrics = metrics
        self.total_steps: int | None = None
        self.tensorboard_dir = storage.join(storage.run_dir(cfg), "tensorboard")
        self._writer = None
        self._local_dir: str | None = None  # events written here first when tensorboard_dir is s3://
        self._uploaded_at = 0.0
        self._reset(step=None)

    def _reset(self, step: int | None) -> None:
        self._since = {"step": step, "time": time.perf_counter(), "samples": 0, "step_s": 0.0, "wait_s": 0.0}

    def start(self) -> None:
        """The first batch of this attempt arrived: throughput is measured from here, not from start-up."""
        self._since["time"] = time.perf_counter()

    def batch_ready(self, *, num_samples: int) -> None:
        """Called by the session as each batch goes to the job: its samples count in this step's throughput
        (counted when it was done instead, a line showed the batches before its step, and 0 samples/s at step 1)."""
        self._since["samples"] += num_samples

    def batch_done(self, *, step_s: float, data_wait_s: float) -> None:
        """Called by the session after every batch: the data-wait share of the batches done since the last line."""
        self._since["step_s"] += step_s
        self._since["wait_s"] += data_wait_s

    def info(self, message: str, *args: Any) -> None:
        """A line in the job's log, from rank 0 only."""
        if self.rank == 0:
            progress_log.info(message, *args)

    def log(self, step: int, *, epoch: int | None, lrs: Callable[[], list[float]], scalars: dict[str, Any]) -> None:
        """Every step; does its work (tensors read, ``lrs()`` called) only every ``log_every`` steps."""
        if self._since["step"] is None:  # the first step of this attempt (maybe after a restore)
            self._since["step"] = step - 1
        if step % self.cfg.log_every and step != self.total_steps:
            return
        lrs = lrs()
        values = {name: _number(value) for name, value in scalars.items()}
        loss = values.get("loss")
        if loss is not None:
            self.metrics.set_loss(loss)
        if lrs:
            self.metrics.set_lr(lrs[0])
        for name, value in values.items():
            if name != "loss":
                self.metrics.gauge(_metric_name(self.kind, name), f"{self.kind} job: {name} (session.log).", value)
        if self.rank != 0:
            self._reset(step)
            return
        since = self._since
        elapsed = max(time.perf_counter() - since["time"], 1e-9)
        steps = max(step - since["step"], 1)
        samples_per_s = since["samples"] * self.world_size / elapsed
        busy = since["step_s"] + since["wait_s"]
        wait_share = since["wait_s"] / busy if busy > 0 else 0.0
        perf = {"samples_per_s": samples_per_s, "data_wait_share": wait_share, "step_s": elapsed / steps}
        self._line(step, epoch, values, lrs, perf, eta_s=(self.total_steps - step) * elapsed / steps if self.total_steps else math.nan)
        self._tensorboard(step, values, lrs, perf)
        self._reset(step)

    def _line(self, step: int, epoch: int | None, values: dict[str, float], lrs: list[float], perf: dict[str, float], *, eta_s: float) -> None:
        total = self.total_steps
        parts = [f"step {step}/{total} ({100 * step / total:.0f}%)" if total else f"step {step}"]
        if epoch is not None:
            parts.append(f"epoch {epoch}")
        parts.append(f"{perf['samples_per_s']:.1f} samples/s")
        parts += [f"{name} {value:.4g}" for name, value in values.items()]
        if lrs:
            parts.append(f"lr {lrs[0]:.3g}")
        parts.append(f"data wait {100 * perf['data_wait_share']:.0f}%")
        if total:
            parts.append(f"ETA {_eta(eta_s)}")
        progress_log.info(" | ".join(parts))

    # -- TensorBoard (rank 0) ------------------------------------------------------------------
    def _open_writer(self):
        if self._writer is None and self.cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            if "://" in self.tensorboard_dir:
                self._local_dir = tempfile.mkdtemp(prefix="labtrain-tb-")
                self._writer = SummaryWriter(self._local_dir)
            else:
                self._writer = SummaryWriter(self.tensorboard_dir)
        return self._writer

    def _tensorboard(self, step: int, values: dict[str, float], lrs: list[float], perf: dict[str, float]) -> None:
        writer = self._open_writer()
        if writer is None:
            return
        for name, value in values.items():
            writer.add_scalar(f"train/{name}", value, step)
        for i, lr in enumerate(lrs):
            writer.add_scalar("train/lr" if len(lrs) == 1 else f"train/lr_{i}", lr, step)
        for name, value in perf.items():
            writer.add_scalar(f"perf/{name}", value, step)
        self._flush()

    def image(self, step: int, tag: str, image_CHW: torch.Tensor) -> None:
        """An image (C, H, W), values in [0, 1], under ``tag`` in TensorBoard (rank 0)."""
        if self.rank != 0:
            return
        writer = self._open_writer()
        if writer is not None:
            writer.add_image(tag, image_CHW.detach().float().clamp(0, 1).cpu(), step)
            self._flush()

    def _flush(self, *, force: bool = False) -> None:
        self._writer.flush()
        if self._local_dir is None or (not force and time.monotonic() - self._uploaded_at < UPLOAD_EVERY_S):
            return
        for name in os.listdir(self._local_dir):
            storage.upload(os.path.join(self._local_dir, name), storage.join(self.tensorboard_dir, name), self.cfg.s3)
        self._uploaded_at = time.monotonic()

    def close(self) -> None:
        if self._writer is None:
            return
        self._flush(force=True)
        self._writer.close()
        if self._local_dir is not None:
            shutil.rmtree(self._local_dir, ignore_errors=True)
        self._writer = None


def _metric_name(kind: str, name: str) -> str:
    return "labtrain_" + re.sub(r"[^a-zA-Z0-9_]", "_", f"{kind}_{name}")
