"""The store on both backends through the same code: SQLite (a file) and PostgreSQL (Debian's server,
started here on a free loopback port as the postgres user)."""

from __future__ import annotations

import pytest

from labtrain.queue import store as st
from labtrain.queue.spec import JobSpec, Quota, UserEntry


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    if request.param == "sqlite":
        s = st.Store(str(tmp_path / "q.db"))
    else:
        s = st.Store(request.getfixturevalue("postgres_url"))
        with s.engine.begin() as conn:  # one database per module: start each test empty
            for table in reversed(st.meta.sorted_tables):
                conn.execute(table.delete())
    yield s
    s.engine.dispose()


def spec(**kw) -> JobSpec:
    return JobSpec(job="jobs.shapes", config="jobs/shapes/configs/demo.yaml", **kw)


def test_users_tokens_and_quotas(store):
    store.upsert_user(UserEntry(name="alice", group="vision", share=2.0, quotas=Quota(gpus=8)), token="alice-token-0123456789")
    assert store.user_by_token("alice-token-0123456789")["name"] == "alice"
    assert store.user_by_token("nope") is None
    assert all(u["token_hash"] != "alice-token-0123456789" for u in store.users())  # stored hashed
    assert store.set_user_quota("alice", Quota(cpus=4, jobs=1))
    assert not store.set_user_quota("nobody", Quota())
    store.set_group_quota("vision", Quota(gpus=16))
    store.set_group_quota("vision", Quota(gpus=32))
    users, groups, _, _ = store.snapshot(0.0, 3600.0)
    assert users["alice"].quota.cpus == 4 and users["alice"].share == 2.0 and groups["vision"].gpus == 32


def test_job_lifecycle_with_requeue_and_submission_ids(store):
    store.upsert_user(UserEntry(name="alice"))
    row, created = store.submit("alice", spec(request_id="r1", overrides=["epochs=1"]), time_limit_s=60, now=100.0)
    again, created_again = store.submit("alice", spec(request_id="r1"), time_limit_s=60, now=101.0)
    assert created and not created_again and again["id"] == row["id"] and row["overrides"] == ["epochs=1"]
    jid = row["id"]
    [d] = store.start_dispatch([jid], now=110.0)
    assert d["state"] == st.DISPATCHING and d["submission_id"] == jid and d["attempt"] == 1
    assert store.start_dispatch([jid], now=111.0) == []  # only from WAITING
    assert store.transition(jid, [st.DISPATCHING], st.RUNNING)
    assert store.transition(jid, [st.RUNNING], st.PREEMPTING)
    assert store.end_holding(jid, [st.PREEMPTING], st.WAITING, 130.0, half_life_s=1e9, gpu_weight=8.0)
    users, _, running, waiting = store.snapshot(130.0, 1e9)
    assert [w.id for w in waiting] == [jid] and running == []
    assert users["alice"].usage == pytest.approx(20.0 * 1)  # 1 worker x 1 CPU x 20 s
    [d] = store.start_dispatch([jid], now=140.0)
    assert d["submission_id"] == f"{jid}-r2" and d["attempt"] == 2
    assert store.transition(jid, [st.DISPATCHING], st.RUNNING)
    assert store.end_holding(jid, [st.RUNNING], st.SUCCEEDED, 150.0, half_life_s=1e9, gpu_weight=8.0)
    # the state history: every state entered, in its transaction, with the attempt and why
    events = store.events(jid)
    assert [(e["state"], e["attempt"]) for e in events] == [
        (st.WAITING, 0), (st.DISPATCHING, 1), (st.RUNNING, 1), (st.PREEMPTING, 1), (st.WAITING, 1), (st.DISPATCHING, 2), (st.RUNNING, 2), (st.SUCCEEDED, 2)]
    assert [e["at"] for e in events][:2] == [100.0, 110.0] and events[-1]["at"] == 150.0
    assert events[0]["message"] == "submitted" and "preempted" in events[4]["message"] and f"{jid}-r2" in events[5]["message"]


def test_history_filters_and_pages_finished_jobs(store):
    for name in ("alice", "bob"):
        store.upsert_user(UserEntry(name=name))
    ended = {}
    for i in range(7):  # ends at 200, 200, 210, 210, 220, 220, 230 (ties: the cursor must page through them)
        user = "alice" if i % 2 == 0 else "bob"
        jid = store.submit(user, spec(), time_limit_s=60, now=100.0 + i)[0]["id"]
        store.start_dispatch([jid], now=150.0)
        assert store.transition(jid, [st.DISPATCHING], st.RUNNING)
        if i == 3:  # preempted once, then finished
            assert store.transition(jid, [st.RUNNING], st.PREEMPTING)
            store.end_holding(jid, [st.PREEMPTING], st.WAITING, 160.0, half_life_s=1e9, gpu_weight=8.0, num_preemptions=1)
            store.start_dispatch([jid], now=170.0)
            assert store.transition(jid, [st.DISPATCHING], st.RUNNING)
        final = [st.SUCCEEDED, st.FAILED, st.CANCELLED, st.TIMEOUT][i % 4]
        store.end_holding(jid, [st.RUNNING], final, 200.0 + 10 * (i // 2), half_life_s=1e9, gpu_weight=8.0)
        ended[jid] = (200.0 + 10 * (i // 2), user, final)
    store.submit("alice", spec(), time_limit_s=60)  # still waiting: not history

    newest_first = sorted(ended, key=lambda j: (ended[j][0], j), reverse=True)
    assert [r["id"] for r in store.history()] == newest_first
    pages, cursor = [], None
    while True:
        page = store.history(limit=3, before=cursor)
        pages.append([r["id"] for r in page])
        if len(page) < 3:
            break
        cursor = (page[-1]["ended_at"], page[-1]["id"])
    assert [j for p in pages for j in p] == newest_first and [len(p) for p in pages] == [3, 3, 1]
    assert {r["id"] for r in store.history(user="alice")} == {j for j, v in ended.items() if v[1] == "alice"}
    assert {r["state"] for r in store.history(states=[st.FAILED, st.TIMEOUT])} == {st.FAILED, st.TIMEOUT}
    [preempted] = store.history(states=["PREEMPTED"])
    assert preempted["num_preemptions"] == 1 and preempted["attempt"] == 2
    either = {r["id"] for r in store.history(states=[st.FAILED, "PREEMPTED"])}  # either one, as `--state FAILED,PREEMPTED` reads
    assert either == {j for j, v in ended.items() if v[2] == st.FAILED} | {preempted["id"]} and len(either) == 3
    assert {r["ended_at"] for r in store.history(since=210.0, until=230.0)} == {210.0, 220.0}


def test_cancel_wins_the_race_with_the_dispatcher(store):
    store.upsert_user(UserEntry(name="alice"))
    waiting, _ = store.submit("alice", spec(), time_limit_s=60)
    assert store.request_cancel(waiting["id"])["state"] == st.CANCELLED
    row, _ = store.submit("alice", spec(), time_limit_s=60)
    store.start_dispatch([row["id"]], now=1.0)
    assert store.request_cancel(row["id"])["state"] == st.CANCELLING
    assert not store.transition(row["id"], [st.DISPATCHING], st.RUNNING)  # the dispatcher's late update is refused
    assert store.job(row["id"])["state"] == st.CANCELLING


def test_usage_is_charged_while_running_and_decays(store):
    store.upsert_user(UserEntry(name="alice"))
    row, _ = store.submit("alice", spec(resources={"workers": 2, "cpus_per_worker": 2, "gpus_per_worker": 1}), time_limit_s=60)
    store.start_dispatch([row["id"]], now=1000.0)
    store.charge_running(1010.0, half_life_s=100.0, gpu_weight=8.0)
    users, _, _, _ = store.snapshot(1010.0, 100.0)
    assert users["alice"].usage == pytest.approx(2 * (2 + 8 * 1) * 10)  # 200 resource-seconds
    users, _, _, _ = store.snapshot(1110.0, 100.0)
    assert users["alice"].usage == pytest.approx(100.0)  # one half-life later
    # per day, undecayed, for the page's chart: 200 on day 0; 20 s more on day 2 (charged at its time)
    store.charge_running(2 * 86400.0 + 1.0, half_life_s=100.0, gpu_weight=8.0)  # charged up to here: all of it lands on day 2
    store.charge_running(2 * 86400.0 + 3.0, half_life_s=100.0, gpu_weight=8.0)
    by_day = store.usage_by_day(2 * 86400.0 + 5.0, days=3)
    assert by_day["alice"][0] == pytest.approx(200.0) and by_day["alice"][1] == 0.0
    assert by_day["alice"][2] == pytest.approx(20 * (2 * 86400.0 + 3.0 - 1010.0))
    assert store.usage_by_day(30 * 86400.0, days=14) == {}  # older than the window
