"""The queue's claim order is fair across tenants (SQLite and PostgreSQL): the next job comes
from the tenant with the fewest running jobs, then the oldest waiting one. Before, claims were
global FIFO by creation time: one tenant's 6 queued fits made another's single fit wait for
all 6."""

from __future__ import annotations

import time

import pytest
from apiserver import database_for
from sqlalchemy import update

from service.jobs import queue
from service.storage.database import Dataset, Job, make_engine, make_sessionmaker, migrate


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request, tmp_path):
    with database_for(request.param, tmp_path / "db.sqlite") as url:
        engine = make_engine(url)
        try:
            migrate(engine)
            yield make_sessionmaker(engine)
        finally:
            engine.dispose()


def _queue_jobs(db, tenant: str, count: int) -> list[str]:
    # One dataset per job: a dataset has at most one active job.
    ids = []
    with db() as session:
        for i in range(count):
            dataset_id = f"{tenant}{i}"
            session.add(Dataset(id=dataset_id, tenant=tenant, name="n", encoder="feats"))
            session.flush()
            ids.append(queue.enqueue(session, dataset_id=dataset_id, tenant=tenant, kind="fit", options={}).id)
            session.commit()
    return ids


def _tenant_of_next_claim(db, owner: str) -> str | None:
    job = queue.claim(db, owner, lease_seconds=60)
    return None if job is None else job.tenant


def test_a_tenant_with_one_job_is_not_queued_behind_another_tenants_many(db):
    a_jobs = _queue_jobs(db, "a", 6)
    b_jobs = _queue_jobs(db, "b", 1)  # queued last
    c_jobs = _queue_jobs(db, "c", 1)
    first = queue.claim(db, "w1", lease_seconds=60)
    assert first is not None and first.id == a_jobs[0]  # all tenants idle: the oldest job
    assert first.started_at is not None and first.attempts == 1
    second = queue.claim(db, "w2", lease_seconds=60)
    assert second is not None and second.id == b_jobs[0]  # FIFO would give a's second job
    third = queue.claim(db, "w3", lease_seconds=60)
    assert third is not None and third.id == c_jobs[0]
    # Every tenant has one running: oldest waiting job again.
    fourth = queue.claim(db, "w4", lease_seconds=60)
    assert fourth is not None and fourth.id == a_jobs[1]
    # Only a's jobs are left: they are claimed (fairness never leaves a job unclaimed).
    assert [_tenant_of_next_claim(db, f"x{i}") for i in range(5)] == ["a", "a", "a", "a", None]


def test_expired_leases_do_not_count_as_running_and_are_claimed_fairly(db):
    a_jobs = _queue_jobs(db, "a", 3)
    b_jobs = _queue_jobs(db, "b", 1)
    assert queue.claim(db, "w1", lease_seconds=60).id == a_jobs[0]
    assert queue.claim(db, "w2", lease_seconds=60).id == b_jobs[0]
    # b's worker dies: its job is claimable again and b has no live running job, so it is
    # taken before a's queued ones (a has one running).
    with db() as session:
        session.execute(update(Job).where(Job.id == b_jobs[0]).values(lease_expires_at=time.time() - 1))
        session.commit()
    again = queue.claim(db, "w3", lease_seconds=60)
    assert again is not None and again.id == b_jobs[0] and again.attempts == 2
    assert again.lease_owner == "w3"
    assert queue.claim(db, "w4", lease_seconds=60).id == a_jobs[1]
