"""The job queue in the database.

States: queued -> running (leased by one worker, renewed by heartbeats) -> succeeded | failed |
cancelled. A running job whose lease expired (its worker died) is claimable again; the job code
resumes from what is already on disk. Claims are compare-and-set UPDATEs, so they are safe
between processes on SQLite and PostgreSQL alike without row locks.
"""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from service.domain import ACTIVE_JOB_STATES as ACTIVE
from service.domain import FINAL_JOB_STATES as FINAL
from service.domain import JobKind, JobState
from service.errors import Conflict
from service.storage.database import Job, utcnow

# A job that killed this many workers is failed rather than handed to the next one.
MAX_ATTEMPTS = 5


class JobConflict(Conflict):
    """A fit job is already queued or running for the dataset."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"a fit job is already queued or running for this dataset: {job_id}")
        self.job_id = job_id


def active_job(session: Session, dataset_id: str) -> Job | None:
    return session.scalars(
        select(Job).where(Job.dataset_id == dataset_id, Job.state.in_(ACTIVE)).limit(1)
    ).first()


def enqueue(session: Session, *, dataset_id: str, tenant: str, kind: JobKind, options: dict[str, Any]) -> Job:
    """Queue a job; one active job per dataset (a second one would race on its files).

    The check is for a clear message; the partial unique index on jobs(dataset_id) decides
    between concurrent requests. On a conflict the session's transaction is rolled back."""
    existing = active_job(session, dataset_id)
    if existing is not None:
        raise JobConflict(existing.id)
    job = Job(
        dataset_id=dataset_id,
        tenant=tenant,
        kind=kind,
        state=JobState.QUEUED,
        options=options,
        progress={"done": 0, "total": None, "per_second": None, "eta_seconds": None},
        attempts=0,
        cancel_requested=False,
    )
    session.add(job)
    try:
        session.flush()
    except IntegrityError:
        session.rollback()
        winner = active_job(session, dataset_id)
        raise JobConflict(winner.id if winner is not None else "unknown") from None
    return job


def _claimable(now: float):  # type: ignore[no-untyped-def]
    return or_(Job.state == JobState.QUEUED, and_(Job.state == JobState.RUNNING, Job.lease_expires_at < now))


def _claim_order(now: float):  # type: ignore[no-untyped-def]
    """Claimable job IDs, fairest first: the tenant with the fewest running jobs (live leases),
    then the oldest waiting job. One tenant's long queue cannot starve another's single fit:
    with one job running for A and none for B, B's job goes next whatever their ages."""
    running = (
        select(Job.tenant.label("tenant"), func.count().label("n"))
        .where(Job.state == JobState.RUNNING, Job.lease_expires_at >= now)
        .group_by(Job.tenant)
        .subquery()
    )
    return (
        select(Job.id)
        .outerjoin(running, running.c.tenant == Job.tenant)
        .where(_claimable(now))
        .order_by(func.coalesce(running.c.n, 0), Job.created_at, Job.id)
    )


def claim(db: sessionmaker, owner: str, lease_seconds: float) -> Job | None:
    """Take the next job in fair order (``_claim_order``): a queued one, or a running one whose
    lease expired; None if there is none.

    One short transaction: read a few candidates, then a compare-and-set UPDATE on each until
    one matches (another worker may have taken it between the read and the UPDATE), commit.
    Fairness between concurrent workers is best effort (two may both pick the same tenant);
    exclusivity is not: the UPDATE's condition decides."""
    with db() as session:
        now = time.time()
        candidates = session.scalars(_claim_order(now).limit(8)).all()
        for job_id in candidates:
            result = session.execute(
                update(Job)
                .where(Job.id == job_id, _claimable(now))
                .values(
                    state=JobState.RUNNING,
                    lease_owner=owner,
                    lease_expires_at=now + lease_seconds,
                    heartbeat_at=now,
                    attempts=Job.attempts + 1,
                    started_at=func.coalesce(Job.started_at, utcnow()),
                )
            )
            if result.rowcount == 1:
                session.commit()
                return session.get(Job, job_id)
        session.rollback()
    return None


def heartbeat(
    db: sessionmaker,
    job_id: str,
    owner: str,
    lease_seconds: float,
    *,
    stage: str | None = None,
    progress: dict[str, Any] | None = None,
) -> tuple[bool, bool]:
    """Renew the lease and publish progress. Returns (still owned, cancel requested)."""
    values: dict[str, Any] = {"lease_expires_at": time.time() + lease_seconds, "heartbeat_at": time.time()}
    if stage is not None:
        values["stage"] = stage
    if progress is not None:
        values["progress"] = progress
    with db() as session:
        result = session.execute(
            update(Job)
            .where(Job.id == job_id, Job.lease_owner == owner, Job.state == JobState.RUNNING)
            .values(**values)
        )
        session.commit()
        cancel = session.scalar(select(Job.cancel_requested).where(Job.id == job_id))
    return result.rowcount == 1, bool(cancel)


def stop_requested(db: sessionmaker, job_id: str, owner: str) -> tuple[bool, bool]:
    """(still owned, cancel requested): a read, for a job that checks between its heartbeats."""
    with db() as session:
        row = session.execute(
            select(Job.state, Job.lease_owner, Job.cancel_requested).where(Job.id == job_id)
        ).first()
    if row is None:
        return False, False
    return row.state == JobState.RUNNING and row.lease_owner == owner, bool(row.cancel_requested)


def finish(
    db: sessionmaker,
    job_id: str,
    owner: str,
    state: str,
    *,
    error: str | None = None,
    result: dict[str, Any] | None = None,
    progress: dict[str, Any] | None = None,
    session: Session | None = None,
) -> bool:
    """Move an owned running job to a final state. With ``session``, joins its transaction (so a
    fit's catalogue rows and the job's success commit together); otherwise commits itself."""
    assert state in FINAL
    statement = (
        update(Job)
        .where(Job.id == job_id, Job.lease_owner == owner, Job.state == JobState.RUNNING)
        .values(state=state, error=error, result=result, finished_at=utcnow(), lease_expires_at=None)
    )
    if progress is not None:
        progress = dict(progress)
        stage = progress.pop("stage", None)
        statement = statement.values(progress=progress, **({"stage": stage} if stage else {}))
    if session is not None:
        return session.execute(statement).rowcount == 1
    with db() as own:
        count = own.execute(statement).rowcount
        own.commit()
    return count == 1


def request_cancel(session: Session, job_id: str) -> bool:
    """Queued jobs are cancelled at once; running ones stop at their next chunk boundary.

    Compare-and-set on the state, so a job claimed or finished meanwhile is handled by what it
    is now. False when the job was no longer active."""
    flagged = session.execute(
        update(Job).where(Job.id == job_id, Job.state.in_(ACTIVE)).values(cancel_requested=True)
    ).rowcount
    # Still queued: no worker will see the flag, so cancel it here. A worker that claimed it
    # meanwhile sees cancel_requested right after its claim.
    session.execute(
        update(Job).where(Job.id == job_id, Job.state == JobState.QUEUED).values(state=JobState.CANCELLED, finished_at=utcnow())
    )
    session.flush()
    return flagged == 1


def counts_by_state(session: Session) -> dict[str, int]:
    rows = session.execute(select(Job.state, func.count()).group_by(Job.state)).all()
    return {state: int(n) for state, n in rows}
