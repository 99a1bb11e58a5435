"""Database: migrations (SQLite and PostgreSQL) match the models; the queue's lease rules."""

from __future__ import annotations

import time

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from apiserver import database_for
from sqlalchemy import update
from sqlalchemy.exc import IntegrityError

from service.jobs import queue
from service.storage.database import Base, Dataset, Job, make_engine, make_sessionmaker, migrate


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request, tmp_path):
    with database_for(request.param, tmp_path / "db.sqlite") as url:
        engine = make_engine(url)
        try:
            yield engine
        finally:
            engine.dispose()


def test_migrations_are_idempotent_and_match_the_models(engine):
    migrate(engine)
    migrate(engine)  # a second start (or a worker starting beside the server) is a no-op
    with engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection), Base.metadata)
    assert diff == []


def test_claims_are_exclusive_and_leases_expire(engine):
    migrate(engine)
    db = make_sessionmaker(engine)
    with db() as session:
        session.add(Dataset(id="d1", tenant="t", name="n", encoder="feats"))
        job = queue.enqueue(session, dataset_id="d1", tenant="t", kind="fit", options={})
        with pytest.raises(queue.JobConflict):
            queue.enqueue(session, dataset_id="d1", tenant="t", kind="fit", options={})
        session.commit()
    claimed = queue.claim(db, "worker-a", lease_seconds=30)
    assert claimed is not None and claimed.id == job.id and claimed.attempts == 1
    assert queue.claim(db, "worker-b", lease_seconds=30) is None  # leased
    assert queue.heartbeat(db, job.id, "worker-a", 30) == (True, False)
    # worker-a "dies": its lease runs out (set in the past, rather than slept through).
    with db() as session:
        session.execute(update(Job).where(Job.id == job.id).values(lease_expires_at=time.time() - 1))
        session.commit()
    taken = queue.claim(db, "worker-b", lease_seconds=30)
    assert taken is not None and taken.id == job.id and taken.attempts == 2
    # The old owner notices it lost the lease and cannot finish the job.
    assert queue.heartbeat(db, job.id, "worker-a", 30) == (False, False)
    assert not queue.finish(db, job.id, "worker-a", "succeeded")
    assert queue.finish(db, job.id, "worker-b", "succeeded", result={"ok": True})
    with db() as session:
        assert queue.counts_by_state(session) == {"succeeded": 1}
        assert queue.active_job(session, "d1") is None


def test_the_database_keeps_one_active_job_per_dataset(engine, monkeypatch):
    migrate(engine)
    db = make_sessionmaker(engine)
    with db() as session:
        session.add(Dataset(id="d1", tenant="t", name="n", encoder="feats"))
        first = queue.enqueue(session, dataset_id="d1", tenant="t", kind="fit", options={})
        session.commit()
    # A second active row is refused by the index itself, whatever the code checked before.
    with db() as session:
        session.add(Job(dataset_id="d1", tenant="t", kind="fit", state="queued", options={}, progress={}))
        with pytest.raises(IntegrityError):
            session.flush()
    # Two requests that both passed the check (a race): the loser gets JobConflict.
    stale_check = iter([None])
    real_active_job = queue.active_job
    monkeypatch.setattr(queue, "active_job", lambda s, d: next(stale_check, None) or real_active_job(s, d))
    with db() as session, pytest.raises(queue.JobConflict) as conflict:
        queue.enqueue(session, dataset_id="d1", tenant="t", kind="fit", options={})
    assert conflict.value.job_id == first.id
    monkeypatch.undo()
    # Finished jobs do not count: a new fit can be queued after the first one ends.
    with db() as session:
        session.execute(update(Job).where(Job.id == first.id).values(state="succeeded"))
        queue.enqueue(session, dataset_id="d1", tenant="t", kind="fit", options={})
        session.commit()


def test_cancel_acts_on_the_state_the_job_has_now(engine):
    migrate(engine)
    db = make_sessionmaker(engine)
    with db() as session:
        session.add(Dataset(id="d1", tenant="t", name="n", encoder="feats"))
        job_id = queue.enqueue(session, dataset_id="d1", tenant="t", kind="fit", options={}).id
        session.commit()
    # Claimed between the API's read (state "queued") and its cancel: the flag still lands.
    assert queue.claim(db, "worker-a", lease_seconds=30) is not None
    with db() as session:
        assert queue.request_cancel(session, job_id) is True
        session.commit()
    assert queue.heartbeat(db, job_id, "worker-a", 30) == (True, True)
    assert queue.finish(db, job_id, "worker-a", "cancelled")
    # Finished: nothing to cancel, nothing changed.
    with db() as session:
        assert queue.request_cancel(session, job_id) is False
        session.commit()
        job = session.get(Job, job_id)
        assert job.state == "cancelled"
    # Queued: cancelled at once.
    with db() as session:
        queued_id = queue.enqueue(session, dataset_id="d1", tenant="t", kind="fit", options={}).id
        assert queue.request_cancel(session, queued_id) is True
        session.commit()
        assert session.get(Job, queued_id).state == "cancelled"
