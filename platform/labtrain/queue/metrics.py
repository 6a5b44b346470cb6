"""The queue's Prometheus metrics, on the service's own registry (served at /metrics)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from labtrain.queue.scheduler import Running, UserShare, Waiting
from labtrain.queue.spec import PRIORITIES

WAIT_BUCKETS_S = (1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 86400, 3 * 86400)
_PRIORITY_NAMES = {rank: name for name, rank in PRIORITIES.items()}


class QueueMetrics:
    def __init__(self):
        self.registry = reg = CollectorRegistry(auto_describe=True)
        self.waiting = Gauge("labtrain_queue_waiting_jobs", "Jobs waiting in the queue.", ["user", "priority"], registry=reg)
        self.wait_seconds = Histogram("labtrain_queue_wait_seconds", "Time from (re)queueing to admission.", buckets=WAIT_BUCKETS_S, registry=reg)
        self.admitted_gpus = Gauge("labtrain_queue_admitted_gpus", "GPUs held by admitted (dispatched or running) jobs.", registry=reg)
        self.admitted_cpus = Gauge("labtrain_queue_admitted_cpus", "CPUs held by admitted (dispatched or running) jobs.", registry=reg)
        self.usage = Gauge("labtrain_queue_fair_share_usage", "Decayed usage in resource-seconds (CPU-seconds plus weighted GPU-seconds).", ["user"], registry=reg)
        self.preemptions = Counter("labtrain_queue_preemptions", "Running jobs preempted for higher-priority ones.", registry=reg)
        self.dispatch_errors = Counter("labtrain_queue_dispatch_errors", "Failed calls to Ray's Job Submission API and failed cycles.", registry=reg)

    def observe_state(self, users: dict[str, UserShare], running: list[Running], waiting: list[Waiting]) -> None:
        counts: dict[tuple[str, str], int] = {}
        for job in waiting:
            key = (job.user, _PRIORITY_NAMES.get(job.priority, str(job.priority)))
            counts[key] = counts.get(key, 0) + 1
        self.waiting.clear()
        for (user, priority), num in counts.items():
            self.waiting.labels(user=user, priority=priority).set(num)
        self.admitted_cpus.set(sum(j.cpus for j in running))
        self.admitted_gpus.set(sum(j.gpus for j in running))
        for user in users.values():
            self.usage.labels(user=user.name).set(user.usage)
