"""Database: migrations (SQLite and PostgreSQL) match the models; the queue's lease rules."""

from __future__ import annotations

import time

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from apiserver import database_for

from service.jobs import queue
from service.storage.database import Base, Dataset, make_engine, make_sessionmaker, migrate


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
    claimed = queue.claim(db, "worker-a", lease_seconds=0.5)
    assert claimed is not None and claimed.id == job.id and claimed.attempts == 1
    assert queue.claim(db, "worker-b", lease_seconds=0.5) is None  # leased
    assert queue.heartbeat(db, job.id, "worker-a", 0.5) == (True, False)
    time.sleep(0.7)  # worker-a "dies": no heartbeat
    taken = queue.claim(db, "worker-b", lease_seconds=30)
    assert taken is not None and taken.id == job.id and taken.attempts == 2
    # The old owner notices it lost the lease and cannot finish the job.
    assert queue.heartbeat(db, job.id, "worker-a", 30) == (False, False)
    assert not queue.finish(db, job.id, "worker-a", "succeeded")
    assert queue.finish(db, job.id, "worker-b", "succeeded", result={"ok": True})
    with db() as session:
        assert queue.counts_by_state(session) == {"succeeded": 1}
        assert queue.active_job(session, "d1") is None
