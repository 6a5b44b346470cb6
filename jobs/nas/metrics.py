"""The search driver's metrics: trials done / running / failed, best score, predictor rank correlation.

Labels are the search name (``job``), ``kind="nas"`` and the ``method``; finished trials also carry their
``status`` (done, failed). With ``LABTRAIN_METRICS_DIR`` set (every node of the local cluster sets it), the
values go to the node's directory and the node exporter serves them next to the training workers'.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from labtrain.metrics import job_registry

TRIAL_BUCKETS_S = (0.01, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600)


class NasMetrics:
    LABELS = ("job", "kind", "method")

    def __init__(self, *, job: str, registry: CollectorRegistry | None = None):
        reg = registry if registry is not None else job_registry()
        self.registry = reg
        self.job = job
        labels = self.LABELS
        self.trials = Counter("labtrain_nas_trials", "Trials finished, by status (done: scored; failed: raised or lost its worker past the retries).", (*labels, "status"), registry=reg)
        self.running = Gauge("labtrain_nas_trials_running", "Trials in flight.", labels, multiprocess_mode="mostrecent", registry=reg)
        self.best_score = Gauge("labtrain_nas_best_score", "Best score found so far (the evaluator's score: table value or validation accuracy).", labels, multiprocess_mode="mostrecent", registry=reg)
        self.rank_correlation = Gauge("labtrain_nas_predictor_rank_correlation", "Kendall tau of the predictor's estimates against the results of the last batch.", labels, multiprocess_mode="mostrecent", registry=reg)
        self.trial_time = Histogram("labtrain_nas_trial_seconds", "Wall time of one trial on its worker.", labels, buckets=TRIAL_BUCKETS_S, registry=reg)

    def _labels(self, method: str) -> dict[str, str]:
        return {"job": self.job, "kind": "nas", "method": method}

    def start(self, method: str) -> None:
        """Export both trial counters from the start, at 0 until a trial finishes."""
        for status in ("done", "failed"):
            self.trials.labels(**self._labels(method), status=status)
        self.running.labels(**self._labels(method)).set(0)

    def finished(self, method: str, *, ok: bool, seconds: float | None) -> None:
        self.trials.labels(**self._labels(method), status="done" if ok else "failed").inc()
        if seconds is not None:
            self.trial_time.labels(**self._labels(method)).observe(seconds)

    def update(self, method: str, *, running: int, best: float | None, rank_correlation: float | None) -> None:
        lab = self._labels(method)
        self.running.labels(**lab).set(running)
        if best is not None:
            self.best_score.labels(**lab).set(best)
        if rank_correlation is not None:
            self.rank_correlation.labels(**lab).set(rank_correlation)
