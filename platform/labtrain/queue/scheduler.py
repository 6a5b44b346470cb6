"""The scheduling policy as pure functions: no store, no Ray, no clock (``now`` is an argument).

One cycle (:func:`plan`) orders the waiting jobs by priority class, then fair share, then age, and walks
that order once:

* a job over its user's or group's quota is passed over (it does not block others);
* the first job within quota that fits in the free resources starts; the first that does not is the *head*;
* after the head, a job that fits may start (backfill) only if it cannot delay the head: it ends, by its
  time limit, before the head's *shadow time* (when running jobs' time limits free enough for the head),
  or it only uses resources the head will not need even then (EASY backfill);
* the head may preempt lower-priority running jobs when stopping them frees its whole gang.

Fair share is Slurm's classic factor ``2 ** (-(usage / total usage) / (share / total shares))``, where
usage is resource-seconds decayed with a half-life (:func:`decay`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

EPS = 1e-9


@dataclass(slots=True, frozen=True)
class Quota:
    """None is no limit."""

    gpus: float | None = None
    cpus: float | None = None
    jobs: int | None = None


@dataclass(slots=True)
class UserShare:
    name: str
    group: str
    share: float
    usage: float  # decayed resource-seconds, as of ``now``
    quota: Quota = field(default_factory=Quota)


@dataclass(slots=True)
class Waiting:
    id: str
    user: str
    priority: int
    submitted_at: float
    cpus: float
    gpus: float
    memory: float
    time_limit_s: float


@dataclass(slots=True)
class Running:
    id: str
    user: str
    priority: int
    started_at: float
    cpus: float
    gpus: float
    memory: float
    time_limit_s: float
    stopping: bool = False  # being cancelled or preempted: holds its resources until Ray says it stopped

    @property
    def end_s(self) -> float:
        return self.started_at + self.time_limit_s


@dataclass(slots=True)
class Plan:
    admit: list[str] = field(default_factory=list)
    backfilled: list[str] = field(default_factory=list)  # the subset of admit that started ahead of the head
    preempt: list[str] = field(default_factory=list)
    head: str | None = None
    shadow_s: float | None = None  # when the head can start at the latest, by running jobs' time limits
    waits: dict[str, tuple] = field(default_factory=dict)  # waiting job -> why, as (kind, detail...): see reason()


def reason(why: tuple, plan: "Plan") -> str:
    """A waiting job's REASON in words, from its entry in ``Plan.waits`` (formatted only when it changes)."""
    kind, *detail = why
    if kind == "unknown_user":
        return "its user is not in the queue any more"
    if kind == "too_big":
        return "the gang is larger than the whole cluster"
    if kind == "quota":
        who, what, held, limit = detail
        return f"{who} quota: {what} {held:g} held of {limit:g}"
    if kind == "head":
        return f"next to start: waiting for {', '.join(detail[0]) or 'resources'} to free up"
    if kind == "behind":
        return "behind the next job to start (priority, then fair share, then age); backfills only if it cannot delay that one"
    return kind


def decay(usage: float, elapsed_s: float, half_life_s: float) -> float:
    """Usage ``elapsed_s`` later: halves every ``half_life_s``."""
    return usage * 2.0 ** (-max(elapsed_s, 0.0) / half_life_s)


def fair_share_factors(users: dict[str, UserShare]) -> dict[str, float]:
    """Slurm's fair-share factor in (0, 1]: 1 for no usage, 0.5 when usage fraction equals share fraction."""
    total_usage = sum(u.usage for u in users.values())
    total_share = sum(u.share for u in users.values()) or 1.0
    if total_usage <= 0:
        return {name: 1.0 for name in users}
    return {name: 2.0 ** (-(u.usage / total_usage) / (u.share / total_share)) for name, u in users.items()}


def order(waiting: list[Waiting], factors: dict[str, float]) -> list[Waiting]:
    """Priority class (high first), then fair-share factor (high first), then age (old first)."""
    return sorted(waiting, key=lambda j: (-j.priority, -factors.get(j.user, 1.0), j.submitted_at, j.id))


class _Vec:
    """Free or held resources: CPUs, GPUs, memory (bytes)."""

    __slots__ = ("cpus", "gpus", "memory")

    def __init__(self, cpus: float = 0.0, gpus: float = 0.0, memory: float = 0.0):
        self.cpus, self.gpus, self.memory = cpus, gpus, memory

    def fits(self, job) -> bool:
        return job.cpus <= self.cpus + EPS and job.gpus <= self.gpus + EPS and job.memory <= self.memory + EPS

    def add(self, job, sign: float = 1.0) -> None:
        self.cpus += sign * job.cpus
        self.gpus += sign * job.gpus
        self.memory += sign * job.memory

    def copy(self) -> "_Vec":
        return _Vec(self.cpus, self.gpus, self.memory)


def _shadow(head: Waiting, free: _Vec, running: list[Running], now: float) -> tuple[float, _Vec]:
    """When running jobs free enough for ``head`` (each by its time limit; a job being stopped counts as
    ending now), and what is left over for it then. ``running`` includes the jobs started this cycle."""
    ends = sorted((now if r.stopping else r.end_s, i) for i, r in enumerate(running))
    avail = free.copy()
    for end_s, i in ends:
        avail.add(running[i])
        if avail.fits(head):
            avail.add(head, -1.0)
            return end_s, avail
    return math.inf, avail  # only reached when a running job's resources are not in the capacity


def _short_of(head: Waiting, avail: _Vec) -> tuple[bool, bool, bool]:
    return (head.cpus > avail.cpus + EPS, head.gpus > avail.gpus + EPS, head.memory > avail.memory + EPS)


def _choose_victims(head: Waiting, free: _Vec, running: list[Running]) -> list[str]:
    """Lower-priority running jobs whose stop frees the head's gang: lowest priority first, then the most
    recently started (least work lost), only jobs holding what the head is short of, and none that the
    others make unnecessary. Empty when even all of them would not be enough."""
    short = _short_of(head, free)
    candidates = sorted(
        (r for r in running if r.priority < head.priority and not r.stopping and any(s and held > EPS for s, held in zip(short, (r.cpus, r.gpus, r.memory)))),
        key=lambda r: (r.priority, -r.started_at),
    )
    avail, victims = free.copy(), []
    for job in candidates:
        victims.append(job)
        avail.add(job)
        if avail.fits(head):
            for victim in list(victims):  # drop the ones the others make unnecessary, most valuable first
                avail.add(victim, -1.0)
                if avail.fits(head):
                    victims.remove(victim)
                else:
                    avail.add(victim)
            return [v.id for v in victims]
    return []


def plan(
    *,
    capacity: tuple[float, float, float],
    users: dict[str, UserShare],
    groups: dict[str, Quota],
    running: list[Running],
    waiting: list[Waiting],
    now: float,
    preemption: bool = True,
) -> Plan:
    """One scheduling cycle. ``capacity`` is (CPUs, GPUs, memory bytes) of the cluster the queue owns."""
    total = _Vec(*capacity)
    free = total.copy()
    held: dict[str, list[float]] = {}  # user or "group:<name>" -> [cpus, gpus, jobs]
    for job in running:
        free.add(job, -1.0)
        for key in (job.user, "group:" + users[job.user].group if job.user in users else None):
            if key is not None:
                h = held.setdefault(key, [0.0, 0.0, 0])
                h[0] += job.cpus
                h[1] += job.gpus
                h[2] += 1

    def over(key: str, quota: Quota | None, job: Waiting) -> tuple | None:
        """(what, held, limit) of the first limit of ``quota`` that ``job`` would pass, or None."""
        if quota is None:
            return None
        cpus, gpus, num_jobs = held.get(key, (0.0, 0.0, 0))
        if quota.cpus is not None and cpus + job.cpus > quota.cpus + EPS:
            return ("CPUs", cpus, quota.cpus)
        if quota.gpus is not None and gpus + job.gpus > quota.gpus + EPS:
            return ("GPUs", gpus, quota.gpus)
        if quota.jobs is not None and num_jobs + 1 > quota.jobs:
            return ("jobs", num_jobs, quota.jobs)
        return None

    def take(job: Waiting) -> None:
        free.add(job, -1.0)
        group = users[job.user].group
        for key in (job.user, "group:" + group):
            h = held.setdefault(key, [0.0, 0.0, 0])
            h[0] += job.cpus
            h[1] += job.gpus
            h[2] += 1

    result = Plan()
    extra: _Vec | None = None
    started: list[Running] = []  # jobs admitted this cycle: they hold resources until their time limit too
    for job in order(waiting, fair_share_factors(users)):
        user = users.get(job.user)
        if user is None or not total.fits(job):  # it can never start
            result.waits[job.id] = ("unknown_user",) if user is None else ("too_big",)
            continue
        limit = over(job.user, user.quota, job)
        group_limit = None if limit else over("group:" + user.group, groups.get(user.group), job)
        if limit or group_limit:
            result.waits[job.id] = ("quota", "user" if limit else f"group {user.group}", *(limit or group_limit))
            continue
        fits = free.fits(job)
        if result.head is None:
            if fits:
                take(job)
                result.admit.append(job.id)
                started.append(Running(job.id, job.user, job.priority, now, job.cpus, job.gpus, job.memory, job.time_limit_s))
                continue
            result.head = job.id
            result.waits[job.id] = ("head", tuple(name for name, s in zip(("CPUs", "GPUs", "memory"), _short_of(job, free)) if s))
            result.shadow_s, extra = _shadow(job, free, running + started, now)
            if preemption and not any(r.stopping for r in running):
                result.preempt = _choose_victims(job, free, running)
                if result.preempt:
                    break  # the freed resources are the head's; nothing backfills into them
            continue
        result.waits[job.id] = ("behind",)
        if free.cpus <= EPS and free.gpus <= EPS:
            break  # nothing more can fit this cycle
        if not fits or math.isinf(result.shadow_s):
            continue
        ends_before_head = now + job.time_limit_s <= result.shadow_s
        if ends_before_head or extra.fits(job):
            if not ends_before_head:
                extra.add(job, -1.0)
            take(job)
            del result.waits[job.id]
            result.admit.append(job.id)
            result.backfilled.append(job.id)
    return result
