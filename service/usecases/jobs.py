"""Jobs: start a fit, read a job, cancel it, list a dataset's jobs (archive scorings are queued by
``usecases.scores``)."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service import schemas
from service.domain import ACTIVE_JOB_STATES, JobKind
from service.encoders.names import check_tenant_encoder
from service.errors import Conflict, NotFound, TooLarge
from service.jobs import queue
from service.jobs.scoring import release_inputs
from service.storage.database import Job, Upload
from service.usecases.context import AppContext
from service.usecases.datasets import MAX_ID_LENGTH, allowed_encoders, owned, utc
from service.usecases.uploads import check_data_shape, dataset_shape

PROGRESS_FIELDS = ("done", "total", "per_second", "eta_seconds")


def job_out(job: Job) -> schemas.JobOut:
    progress = dict(job.progress or {})
    return schemas.JobOut(
        id=job.id,
        dataset_id=job.dataset_id,
        kind=job.kind,
        state=job.state,
        stage=job.stage,
        progress=schemas.Progress(**{k: progress[k] for k in PROGRESS_FIELDS if progress.get(k) is not None}),
        error=job.error,
        result=job.result,
        attempts=job.attempts,
        cancel_requested=job.cancel_requested,
        created_at=utc(job.created_at),
        started_at=utc(job.started_at),
        finished_at=utc(job.finished_at),
    )


def check_active_jobs_quota(ctx: AppContext, session: Session, tenant: str) -> None:
    """The tenant's queued and running jobs (fits and archive scorings) against
    DIFFICULTY_MAX_ACTIVE_JOBS_PER_TENANT, before a new one is queued."""
    limit = ctx.settings.max_active_jobs_per_tenant
    active = session.scalar(
        select(func.count()).select_from(Job).where(Job.tenant == tenant, Job.state.in_(ACTIVE_JOB_STATES))
    )
    if active >= limit:
        raise TooLarge(f"this tenant has {active} jobs (fits, archive scorings) queued or running, the limit "
                       "(DIFFICULTY_MAX_ACTIVE_JOBS_PER_TENANT): wait for one to finish")


def start_fit(ctx: AppContext, tenant: str, dataset_id: str, options: schemas.FitOptions) -> schemas.JobAccepted:
    with ctx.db() as session:
        dataset = owned(session, tenant, dataset_id)
        dataset_uploads = list(session.scalars(select(Upload).where(Upload.dataset_id == dataset.id)))
        if not dataset_uploads:
            raise Conflict("the dataset has no items: upload an archive (items) or embeddings first")
        # The operator's lists and limits may have changed since: checked again before queueing.
        check_tenant_encoder(dataset.encoder, allowed_encoders(ctx))
        check_data_shape(ctx.settings, *dataset_shape(ctx, dataset, dataset_uploads))
        check_active_jobs_quota(ctx, session, tenant)
        job = queue.enqueue(
            session,
            dataset_id=dataset.id,
            tenant=tenant,
            kind=JobKind.FIT,
            options={"normalize": options.normalize, "shrinkage": options.shrinkage},
        )
        session.commit()
        return schemas.JobAccepted(job_id=job.id, state=job.state)


def owned_job(session: Session, tenant: str, job_id: str) -> Job:
    job = session.get(Job, job_id) if len(job_id) <= MAX_ID_LENGTH else None
    if job is None or job.tenant != tenant:
        raise NotFound("job")
    return job


def get_job(ctx: AppContext, tenant: str, job_id: str) -> schemas.JobOut:
    with ctx.db() as session:
        return job_out(owned_job(session, tenant, job_id))


def cancel_job(ctx: AppContext, tenant: str, job_id: str) -> schemas.JobOut:
    with ctx.db() as session:
        job = owned_job(session, tenant, job_id)
        if not queue.request_cancel(session, job.id):
            session.rollback()
            session.refresh(job)
            raise Conflict(f"the job already {job.state}")
        session.commit()
        session.refresh(job)
        out = job_out(job)
    # A queued scoring cancelled here never reaches a worker: its archive goes now.
    release_inputs(ctx.settings, ctx.db, job_id)
    return out


def list_jobs(ctx: AppContext, tenant: str, dataset_id: str) -> list[schemas.JobOut]:
    with ctx.db() as session:
        dataset = owned(session, tenant, dataset_id)
        jobs = session.scalars(select(Job).where(Job.dataset_id == dataset.id).order_by(Job.created_at.desc())).all()
        return [job_out(j) for j in jobs]
