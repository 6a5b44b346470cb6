"""The scheduling policy as pure functions: fair share, decay, quotas, gangs, backfill, preemption."""

from __future__ import annotations

import math

import pytest

from labtrain.queue.scheduler import Quota, Running, UserShare, Waiting, decay, fair_share_factors, order, plan

HIGH, NORMAL, LOW = 2, 1, 0


def users(*specs, **quotas):
    """users(("alice", "vision", 1.0, usage), ...)"""
    return {n: UserShare(n, g, share, usage, quotas.get(n, Quota())) for n, g, share, usage in specs}


def waiting(id, user, *, cpus=1.0, gpus=0.0, at=0.0, priority=NORMAL, limit=100.0):
    return Waiting(id, user, priority, at, cpus, gpus, 0.0, limit)


def running(id, user, *, cpus=1.0, gpus=0.0, started=0.0, priority=NORMAL, limit=100.0, stopping=False):
    return Running(id, user, priority, started, cpus, gpus, 0.0, limit, stopping)


def test_decay_halves_every_half_life():
    assert decay(100.0, 0.0, 60.0) == 100.0
    assert decay(100.0, 60.0, 60.0) == pytest.approx(50.0)
    assert decay(100.0, 180.0, 60.0) == pytest.approx(12.5)


def test_fair_share_factor_is_slurms():
    u = users(("a", "g", 1.0, 0.0), ("b", "g", 1.0, 0.0))
    assert fair_share_factors(u) == {"a": 1.0, "b": 1.0}
    u = users(("a", "g", 1.0, 300.0), ("b", "g", 1.0, 100.0))
    f = fair_share_factors(u)
    assert f["a"] == pytest.approx(2 ** (-0.75 / 0.5)) and f["b"] == pytest.approx(2 ** (-0.25 / 0.5))
    # Twice the share makes the same usage count half as much.
    u = users(("a", "g", 2.0, 100.0), ("b", "g", 1.0, 100.0))
    f = fair_share_factors(u)
    assert f["a"] > f["b"]


def test_order_is_priority_then_fair_share_then_age():
    u = users(("heavy", "g", 1.0, 1000.0), ("light", "g", 1.0, 10.0))
    f = fair_share_factors(u)
    jobs = [waiting("h-old", "heavy", at=1), waiting("l-new", "light", at=5), waiting("h-high", "heavy", at=9, priority=HIGH), waiting("l-old", "light", at=2)]
    assert [j.id for j in order(jobs, f)] == ["h-high", "l-old", "l-new", "h-old"]


def test_decayed_usage_lets_an_old_heavy_user_back_in_front():
    # Same raw usage, but alice's was a long time ago (4 half-lives): bob's recent usage ranks him behind.
    alice = decay(1000.0, 4 * 3600.0, 3600.0)
    bob = decay(1000.0, 0.0, 3600.0)
    u = users(("alice", "g", 1.0, alice), ("bob", "g", 1.0, bob))
    jobs = [waiting("b1", "bob", at=0), waiting("a1", "alice", at=10)]
    assert [j.id for j in order(jobs, fair_share_factors(u))] == ["a1", "b1"]


def test_gang_is_admitted_whole_or_not_at_all():
    u = users(("a", "g", 1.0, 0.0))
    p = plan(capacity=(4, 0, math.inf), users=u, groups={}, running=[running("r", "a", cpus=2, limit=1e9)],
             waiting=[waiting("gang", "a", cpus=3)], now=0.0)
    assert p.admit == [] and p.head == "gang"
    p = plan(capacity=(4, 0, math.inf), users=u, groups={}, running=[running("r", "a", cpus=1)], waiting=[waiting("gang", "a", cpus=3)], now=0.0)
    assert p.admit == ["gang"]


def test_gpu_gang_needs_its_gpus():
    u = users(("a", "g", 1.0, 0.0))
    p = plan(capacity=(64, 8, math.inf), users=u, groups={}, running=[running("r", "a", gpus=4)], waiting=[waiting("g8", "a", gpus=8), waiting("g4", "a", gpus=4, at=1, limit=1e9)], now=0.0)
    assert p.head == "g8" and p.admit == []  # g4 would delay g8 (its limit ends after r's)


def test_user_and_group_quotas_hold_and_do_not_block_others():
    u = users(("a", "vision", 1.0, 0.0), ("b", "vision", 1.0, 0.0), ("c", "nlp", 1.0, 0.0), a=Quota(cpus=2))
    run = [running("r1", "a", cpus=2)]
    p = plan(capacity=(16, 0, math.inf), users=u, groups={}, running=run, waiting=[waiting("a2", "a", at=0), waiting("b1", "b", at=1)], now=0.0)
    assert p.admit == ["b1"]  # a is at its CPU quota; b goes ahead
    p = plan(capacity=(16, 0, math.inf), users=u, groups={"vision": Quota(jobs=2)}, running=run,
             waiting=[waiting("b1", "b", at=1), waiting("b2", "b", at=2), waiting("c1", "c", at=3)], now=0.0)
    assert p.admit == ["b1", "c1"]  # vision may run 2 jobs at once: r1 and b1
    u2 = users(("a", "vision", 1.0, 0.0), a=Quota(gpus=1, jobs=5))
    p = plan(capacity=(16, 8, math.inf), users=u2, groups={}, running=[], waiting=[waiting("x", "a", gpus=1), waiting("y", "a", gpus=1, at=1)], now=0.0)
    assert p.admit == ["x"]


def test_backfill_only_when_it_cannot_delay_the_head():
    u = users(("a", "g", 1.0, 0.0), ("b", "g", 1.0, 0.0))
    # 4 CPUs; a 2-CPU job runs until t=100. The head needs 4 CPUs, so it starts at t=100 (its shadow time).
    run = [running("r", "a", cpus=2, started=0, limit=100)]
    jobs = [waiting("head", "a", cpus=4, at=0), waiting("short", "b", cpus=2, at=1, limit=50), waiting("long", "b", cpus=2, at=2, limit=500)]
    p = plan(capacity=(4, 0, math.inf), users=u, groups={}, running=run, waiting=jobs, now=10.0)
    assert p.head == "head" and p.shadow_s == 100
    assert p.admit == ["short"] and p.backfilled == ["short"]  # 10 + 50 <= 100; "long" would end at 510
    p = plan(capacity=(4, 0, math.inf), users=u, groups={}, running=run, waiting=jobs, now=60.0)
    assert p.admit == []  # now "short" would end at 110, after the head's start


def test_backfill_into_resources_the_head_does_not_need():
    u = users(("a", "g", 1.0, 0.0), ("b", "g", 1.0, 0.0))
    # 8 CPUs; r holds 6 until t=100; the head needs 4, so at t=100 4 CPUs are left over: a long 2-CPU job fits there.
    run = [running("r", "a", cpus=6, started=0, limit=100)]
    jobs = [waiting("head", "a", cpus=4, at=0), waiting("long", "b", cpus=2, at=1, limit=1e6), waiting("long2", "b", cpus=2, at=2, limit=1e6)]
    p = plan(capacity=(8, 0, math.inf), users=u, groups={}, running=run, waiting=jobs, now=0.0)
    assert p.admit == ["long"]  # long2 would eat into the head's CPUs at t=100


def test_preemption_frees_the_head_with_the_fewest_lowest_priority_jobs():
    u = users(("a", "g", 1.0, 0.0), ("b", "g", 1.0, 0.0))
    run = [running("low-old", "a", cpus=2, started=0, priority=LOW), running("low-new", "a", cpus=2, started=50, priority=LOW),
           running("normal", "b", cpus=2, started=10, priority=NORMAL)]
    p = plan(capacity=(6, 0, math.inf), users=u, groups={}, running=run, waiting=[waiting("urgent", "b", cpus=2, priority=HIGH, at=60)], now=60.0)
    assert p.preempt == ["low-new"] and p.admit == []  # the most recently started low job loses the least work
    p = plan(capacity=(6, 0, math.inf), users=u, groups={}, running=run, waiting=[waiting("urgent", "b", cpus=6, priority=NORMAL, at=60)], now=60.0)
    assert p.preempt == []  # never preempt an equal priority, and preempting both lows (4 CPUs) would not be enough
    p = plan(capacity=(6, 0, math.inf), users=u, groups={}, running=run, waiting=[waiting("urgent", "b", cpus=2, priority=HIGH, at=60)], now=60.0, preemption=False)
    assert p.preempt == []
    stopping = [*run[:2], running("normal", "b", cpus=2, started=10, stopping=True)]
    p = plan(capacity=(6, 0, math.inf), users=u, groups={}, running=stopping, waiting=[waiting("urgent", "b", cpus=2, priority=HIGH, at=60)], now=60.0)
    assert p.preempt == []  # a stop is already under way: wait for it instead of preempting more


def test_job_larger_than_the_cluster_is_not_the_head():
    u = users(("a", "g", 1.0, 0.0))
    p = plan(capacity=(4, 0, math.inf), users=u, groups={}, running=[], waiting=[waiting("huge", "a", cpus=64), waiting("small", "a", cpus=1, at=1)], now=0.0)
    assert p.admit == ["small"] and p.head is None


def test_two_users_interleave_by_fair_share_over_cycles():
    """Simulate: one job at a time, each runs 10 s; usage is charged as it runs. FIFO would give a,a,a,b,b,b."""
    u = users(("a", "g", 1.0, 0.0), ("b", "g", 1.0, 0.0))
    pending = [waiting(f"a{i}", "a", cpus=4, at=i) for i in range(3)] + [waiting(f"b{i}", "b", cpus=4, at=10 + i) for i in range(3)]
    started = []
    for step in range(6):
        p = plan(capacity=(4, 0, math.inf), users=u, groups={}, running=[], waiting=pending, now=100.0 * step)
        assert len(p.admit) == 1
        job = next(j for j in pending if j.id == p.admit[0])
        pending.remove(job)
        started.append(job.id)
        u[job.user].usage += 40.0 + step  # 4 CPUs x 10 s (the step makes later work slightly costlier, breaking ties)
    assert started == ["a0", "b0", "a1", "b1", "a2", "b2"]


def test_a_job_started_this_cycle_counts_when_placing_the_head():
    """4 CPUs: A (2 CPUs, 100 s) starts now, the head H needs all 4 and starts when A ends; B (2 CPUs, for
    ever) fits beside A now but would hold 2 CPUs past t=100 and delay H: it must not backfill."""
    u = users(("a", "g", 1.0, 0.0), ("b", "g", 1.0, 0.0))
    jobs = [waiting("A", "a", cpus=2, at=0, limit=100), waiting("H", "a", cpus=4, at=1), waiting("B", "b", cpus=2, at=2, limit=1e6)]
    p = plan(capacity=(4, 0, math.inf), users=u, groups={}, running=[], waiting=jobs, now=0.0)
    assert p.admit == ["A"] and p.head == "H" and p.shadow_s == 100


def test_nothing_backfills_into_what_a_stopping_job_frees_for_the_head():
    """L is being preempted for H; the 1 free CPU beside it is not for a 60 s job, since H starts the moment L stops."""
    u = users(("a", "g", 1.0, 0.0), ("b", "g", 1.0, 0.0))
    run = [running("L", "a", cpus=3, started=0, limit=1e6, priority=LOW, stopping=True)]
    jobs = [waiting("H", "b", cpus=4, at=0, priority=HIGH), waiting("S", "a", cpus=1, at=1, limit=60, priority=LOW)]
    p = plan(capacity=(4, 0, math.inf), users=u, groups={}, running=run, waiting=jobs, now=10.0)
    assert p.head == "H" and p.shadow_s == 10.0 and p.admit == []


def test_preemption_stops_only_jobs_holding_what_the_head_lacks():
    u = users(("a", "g", 1.0, 0.0), ("b", "g", 1.0, 0.0))
    # 8 CPUs, 2 GPUs: a newer CPU-only low job and an older GPU low job. The head lacks a GPU, not CPUs.
    run = [running("gpu-old", "a", cpus=2, gpus=2, started=0, priority=LOW), running("cpu-new", "a", cpus=4, started=50, priority=LOW)]
    p = plan(capacity=(8, 2, math.inf), users=u, groups={}, running=run, waiting=[waiting("urgent", "b", cpus=1, gpus=1, priority=HIGH, at=60)], now=60.0)
    assert p.preempt == ["gpu-old"]
    # 6 CPUs: low jobs of 1, 2 and 3 CPUs, newest first; the head needs 3. Greedy by "newest first" takes
    # c1, then c2 (3 CPUs): enough. Then c1 is dropped if c2 alone would do: it would not (2 + 0 free).
    run = [running("c1", "a", cpus=1, started=30, priority=LOW), running("c2", "a", cpus=3, started=20, priority=LOW), running("c3", "a", cpus=2, started=10, priority=LOW)]
    p = plan(capacity=(6, 0, math.inf), users=u, groups={}, running=run, waiting=[waiting("urgent", "b", cpus=3, priority=HIGH, at=60)], now=60.0)
    assert p.preempt == ["c2"]  # c1 was taken first, but c2 alone frees the 3 CPUs


def test_every_waiting_job_gets_its_reason_in_words():
    from labtrain.queue.scheduler import reason

    u = users(("alice", "vision", 1.0, 0.0), ("bob", "vision", 1.0, 0.0), alice=Quota(jobs=1))
    result = plan(capacity=(4.0, 0.0, math.inf), users=u, groups={"vision": Quota(gpus=0)},
                  running=[running("r1", "alice", cpus=1), running("r2", "bob", cpus=2)],
                  waiting=[waiting("held", "alice", at=1), waiting("head", "bob", cpus=2, at=2), waiting("next", "bob", cpus=2, at=3),
                           waiting("huge", "bob", cpus=64, at=4), waiting("gpu", "bob", cpus=0.5, gpus=1, at=5), waiting("ghost", "carol", at=6)],
                  now=10.0)
    words = {job: reason(why, result) for job, why in result.waits.items()}
    assert words["held"] == "user quota: jobs 1 held of 1"
    assert words["head"] == "next to start: waiting for CPUs to free up" and result.head == "head"
    assert words["next"].startswith("behind the next job to start (priority, then fair share, then age)")
    assert words["huge"] == words["gpu"] == "the gang is larger than the whole cluster"
    assert words["ghost"] == "its user is not in the queue any more"
    u = users(("alice", "vision", 1.0, 0.0))
    result = plan(capacity=(8.0, 4.0, math.inf), users=u, groups={"vision": Quota(gpus=1)}, running=[running("r", "alice", cpus=1, gpus=1)],
                  waiting=[waiting("g", "alice", gpus=1)], now=1.0)
    assert reason(result.waits["g"], result) == "group vision quota: GPUs 1 held of 1"
