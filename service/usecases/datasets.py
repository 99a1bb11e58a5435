"""Datasets: create, list, read, delete; the tenant check every other use case starts from."""

from __future__ import annotations

import shutil
from collections import Counter
from datetime import UTC, datetime

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from service import schemas
from service.domain import ACTIVE_JOB_STATES
from service.encoders.names import check_tenant_encoder
from service.errors import InvalidInput, NotFound, TooLarge
from service.jobs import queue
from service.storage import layout
from service.storage.database import Dataset, Fit, Job, Upload, new_id, utcnow
from service.usecases.context import AppContext

MAX_ID_LENGTH = 64  # longer path parameters cannot be IDs of ours: no database lookup for them


def utc(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; everything stored is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def owned(session: Session, tenant: str, dataset_id: str) -> Dataset:
    """The tenant's dataset; other tenants' datasets are indistinguishable from missing ones."""
    dataset = session.get(Dataset, dataset_id) if len(dataset_id) <= MAX_ID_LENGTH else None
    if dataset is None or dataset.tenant != tenant:
        raise NotFound("dataset")
    return dataset


def fit_out(fit: Fit) -> schemas.FitOut:
    return schemas.FitOut(
        id=fit.id,
        created_at=utc(fit.created_at),
        normalize=fit.normalize,
        shrinkage=fit.shrinkage,
        shrinkage_agnostic=fit.shrinkage_agnostic,
        shrinkage_requested=fit.shrinkage_requested,
        encoder=fit.encoder,
        weights_sha256=fit.weights_sha256,
        num_scored=fit.num_scored,
        dim=fit.dim,
        knn_k=fit.knn_k,
        knn_search=fit.knn_search,
    )


def class_counts(counts: Counter[str]) -> list[schemas.ClassCount]:
    return [schemas.ClassCount(label=k, count=v) for k, v in sorted(counts.items())]


def _dataset_out(session: Session, dataset: Dataset) -> schemas.DatasetOut:
    uploads = session.scalars(select(Upload).where(Upload.dataset_id == dataset.id)).all()
    classes: Counter[str] = Counter()
    for upload in uploads:
        classes.update(upload.classes)
    fit = session.get(Fit, dataset.current_fit_id) if dataset.current_fit_id else None
    active = queue.active_job(session, dataset.id)
    return schemas.DatasetOut(
        id=dataset.id,
        name=dataset.name,
        encoder=dataset.encoder,
        created_at=utc(dataset.created_at),
        num_items=sum(u.num_items for u in uploads),
        num_embedded=sum(u.num_embedded for u in uploads),
        num_failed=sum(u.num_failed for u in uploads),
        classes=class_counts(classes),
        fit=fit_out(fit) if fit else None,
        active_job_id=active.id if active else None,
    )


def allowed_encoders(ctx: AppContext) -> tuple[str, ...]:
    """The image encoders tenants may name: the operator's list and the default encoder."""
    return (ctx.settings.default_encoder, *[e for e in ctx.settings.allowed_encoders if e != ctx.settings.default_encoder])


def create_dataset(ctx: AppContext, tenant: str, body: schemas.DatasetCreate) -> schemas.Created:
    if any(ord(c) < 32 for c in body.name):
        raise InvalidInput("the dataset name must not contain control characters (NUL, newlines, ...)")
    encoder = body.encoder or ctx.settings.default_encoder
    check_tenant_encoder(encoder, allowed_encoders(ctx))
    with ctx.db() as session:
        limit = ctx.settings.max_datasets_per_tenant
        held = session.scalar(select(func.count()).select_from(Dataset).where(Dataset.tenant == tenant))
        if held >= limit:
            raise TooLarge(f"this tenant holds {held} datasets, the limit (DIFFICULTY_MAX_DATASETS_PER_TENANT); "
                           "delete some first")
        dataset = Dataset(id=new_id(), tenant=tenant, name=body.name, encoder=encoder, created_at=utcnow())
        session.add(dataset)
        session.commit()
        return schemas.Created(id=dataset.id, name=dataset.name, encoder=dataset.encoder)


def list_datasets(ctx: AppContext, tenant: str) -> schemas.DatasetList:
    with ctx.db() as session:
        rows = session.scalars(
            select(Dataset).where(Dataset.tenant == tenant).order_by(Dataset.created_at)
        ).all()
        return schemas.DatasetList(items=[_dataset_out(session, d) for d in rows])


def require_dataset(ctx: AppContext, tenant: str, dataset_id: str) -> None:
    """NotFound unless the tenant owns the dataset (one primary-key lookup)."""
    with ctx.db() as session:
        owned(session, tenant, dataset_id)


def get_dataset(ctx: AppContext, tenant: str, dataset_id: str) -> schemas.DatasetOut:
    with ctx.db() as session:
        return _dataset_out(session, owned(session, tenant, dataset_id))


def delete_dataset(ctx: AppContext, tenant: str, dataset_id: str) -> None:
    with ctx.db() as session:
        dataset = owned(session, tenant, dataset_id)
        active = select(Job.id).where(Job.dataset_id == dataset.id, Job.state.in_(ACTIVE_JOB_STATES))
        for job_id in session.scalars(active):
            queue.request_cancel(session, job_id)
        session.execute(delete(Fit).where(Fit.dataset_id == dataset.id))
        session.execute(delete(Upload).where(Upload.dataset_id == dataset.id))
        session.delete(dataset)
        session.commit()
    shutil.rmtree(layout.dataset_dir(ctx.settings.data_dir, dataset_id), ignore_errors=True)
