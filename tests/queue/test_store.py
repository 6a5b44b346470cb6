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
