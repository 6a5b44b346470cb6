"""Prometheus metrics of training workers, and the per-node exporter that serves them.

Names follow DESIGN.md: prefix ``labtrain_``, base units, ``_total`` counters, low-cardinality labels
(job, kind, rank). Every process on a node writes its values to one directory (prometheus-client's
multiprocess mode) and one exporter per node serves them all, so a scrape sees every rank.

The directory is ``LABTRAIN_METRICS_DIR``. labtrain switches prometheus-client into multiprocess mode
for its own metrics only (its own registry, values created after :func:`_multiprocess_values`), so other
users of prometheus-client in the same process, Ray's agents among them, are left as they are.
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, values
from prometheus_client.multiprocess import MultiProcessCollector

METRICS_DIR_ENV = "LABTRAIN_METRICS_DIR"

STEP_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
WAIT_BUCKETS_S = (0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)
CHECKPOINT_BUCKETS_S = (0.05, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 300)


def metrics_dir() -> str | None:
    return os.environ.get(METRICS_DIR_ENV) or None


def _multiprocess_values() -> bool:
    """Make metrics created from now on in this process write to the node's directory, if there is one."""
    path = metrics_dir()
    if path is None:
        return False
    os.makedirs(path, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    if not getattr(values.ValueClass, "_multiprocess", False):
        values.ValueClass = values.MultiProcessValue()
    return True


def job_registry() -> CollectorRegistry:
    """A registry for a job's own metrics (a NAS driver's trial counters, say) that the node exporter
    serves: metrics created after this call write to ``LABTRAIN_METRICS_DIR`` when it is set."""
    _multiprocess_values()
    return CollectorRegistry(auto_describe=True)


class TrainMetrics:
    """One training worker's metrics. Jobs add their own signals with :meth:`gauge`."""

    LABELS = ("job", "kind", "rank")

    def __init__(self, *, job: str, kind: str, rank: int, registry: CollectorRegistry | None = None):
        _multiprocess_values()
        self.registry = registry or CollectorRegistry(auto_describe=True)
        self._labels = {"job": job, "kind": kind, "rank": str(rank)}
        labels = self.LABELS
        reg = self.registry
        self.samples = Counter("labtrain_train_samples", "Training samples consumed.", labels, registry=reg)
        self.steps = Counter("labtrain_train_steps", "Training batches processed (optimizer steps unless run.accumulate_batches > 1).", labels, registry=reg)
        self.step_time = Histogram("labtrain_train_step_seconds", "Wall time of one training step, data wait excluded.", labels, buckets=STEP_BUCKETS_S, registry=reg)
        self.data_wait = Histogram("labtrain_train_data_wait_seconds", "Time a step waited for its batch.", labels, buckets=WAIT_BUCKETS_S, registry=reg)
        self.loss = Gauge("labtrain_train_loss", "Training loss of the latest logged step (every run.log_every steps).", labels, multiprocess_mode="mostrecent", registry=reg)
        self.learning_rate = Gauge("labtrain_train_learning_rate", "Learning rate of the first optimizer at the latest logged step.", labels, multiprocess_mode="mostrecent", registry=reg)
        self.epoch = Gauge("labtrain_train_epoch", "Current epoch.", labels, multiprocess_mode="mostrecent", registry=reg)
        self.checkpoint_time = Histogram("labtrain_checkpoint_seconds", "Wall time to save one checkpoint.", labels, buckets=CHECKPOINT_BUCKETS_S, registry=reg)
        self.skipped_shards = Counter("labtrain_data_skipped_shards", "Unreadable shards skipped.", labels, registry=reg)
        self.skipped_samples = Counter("labtrain_data_skipped_samples", "Samples lost to unreadable shards or failed decoding.", labels, registry=reg)
        self._extra: dict[str, Gauge] = {}

    def batch(self, *, num_samples: int, step_s: float, data_wait_s: float) -> None:
        lab = self._labels
        self.samples.labels(**lab).inc(num_samples)
        self.steps.labels(**lab).inc()
        self.step_time.labels(**lab).observe(step_s)
        self.data_wait.labels(**lab).observe(data_wait_s)

    def set_loss(self, loss: float) -> None:
        self.loss.labels(**self._labels).set(loss)

    def set_lr(self, lr: float) -> None:
        self.learning_rate.labels(**self._labels).set(lr)

    def set_epoch(self, epoch: int) -> None:
        self.epoch.labels(**self._labels).set(epoch)

    def skipped(self, *, shards: int, samples: int) -> None:
        if shards:
            self.skipped_shards.labels(**self._labels).inc(shards)
        if samples:
            self.skipped_samples.labels(**self._labels).inc(samples)

    @contextmanager
    def time_checkpoint(self) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.checkpoint_time.labels(**self._labels).observe(time.perf_counter() - start)

    def gauge(self, name: str, help_text: str, value: float) -> None:
        """A job-specific signal, e.g. ``gauge('labtrain_vatt_conflict_ratio', ..., 0.3)``."""
        if name not in self._extra:
            self._extra[name] = Gauge(name, help_text, self.LABELS, multiprocess_mode="mostrecent", registry=self.registry)
        self._extra[name].labels(**self._labels).set(value)


def node_registry(path: str) -> CollectorRegistry:
    """A registry that reads every process's values from a node's metrics directory."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=path)
    return registry


def serve(port: int, path: str, *, addr: str = "0.0.0.0"):
    """Start the node exporter on ``port`` (HTTP, /metrics) in a background thread; returns the server."""
    from prometheus_client import start_http_server

    os.makedirs(path, exist_ok=True)
    server, _thread = start_http_server(port, addr=addr, registry=node_registry(path))
    return server
