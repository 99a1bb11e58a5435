"""Reading a fitted dataset: score pages and exports, the per-class summary, a sample's
neighbors, the items that could not be embedded, and scoring new items against the fit
(embeddings in the request; an image archive as a job, and that job's result)."""

from __future__ import annotations

from typing import Any

import numpy as np
from sqlalchemy import bindparam, select

from service import schemas
from service.domain import JobKind, JobState
from service.encoders.names import check_tenant_encoder, is_image_encoder
from service.errors import Conflict, InvalidInput, NotFound, TooLarge
from service.ingest.features import check_lengths, load_embeddings, load_ids, load_labels
from service.ingest.safety import inspect_archive
from service.jobs import queue
from service.jobs.scoring import score_table
from service.statistics.label_issues import DEFAULT_THRESHOLD
from service.storage import layout
from service.storage.database import Dataset, Fit, engine_of
from service.storage.embeddings import EmbeddingStore
from service.storage.fits import FitFiles
from service.storage.scores import Cursor, has_label_issues, label_issue_page, page
from service.storage.scorings import ScoringFiles
from service.usecases.context import AppContext
from service.usecases.datasets import MAX_ID_LENGTH, allowed_encoders, require_dataset
from service.usecases.forms import Form
from service.usecases.jobs import check_active_jobs_quota, owned_job

# Failures listed on a scoring result's first page (num_failed counts them all).
MAX_LISTED_FAILURES = 1000


def current_fit(ctx: AppContext, tenant: str, dataset_id: str) -> tuple[Fit, FitFiles]:
    """The tenant's dataset's current fit and its files, in one round trip (the score-page hot
    path)."""
    if len(dataset_id) > MAX_ID_LENGTH:
        raise NotFound("dataset")
    with ctx.db() as session:
        row = session.execute(
            select(Dataset.tenant, Fit)
            .outerjoin(Fit, Fit.id == Dataset.current_fit_id)
            .where(Dataset.id == dataset_id)
        ).first()
        if row is None or row[0] != tenant:
            raise NotFound("dataset")
        fit = row[1]
        if fit is None:
            raise Conflict("dataset is not fitted yet: POST /v1/datasets/{id}/fit and wait for the job to succeed")
        return fit, FitFiles.of(ctx.settings.data_dir, fit.dataset_id, fit.id)


_CURRENT_FIT = select(Dataset.tenant, Dataset.current_fit_id).where(Dataset.id == bindparam("dataset_id"))


def current_fit_files(ctx: AppContext, tenant: str, dataset_id: str) -> tuple[str, FitFiles]:
    """:func:`current_fit` for the score-page hot path: two columns of one row, no ORM objects
    (the Fit row carries the per-class summary, whose JSON would be parsed per request)."""
    if len(dataset_id) > MAX_ID_LENGTH:
        raise NotFound("dataset")
    # A Core connection, not an ORM session: the session's set-up and result loading were 70%
    # of a page's server time (0.6 ms of use case per page, measured in-process).
    with engine_of(ctx.db).connect() as connection:
        row = connection.execute(_CURRENT_FIT, {"dataset_id": dataset_id}).first()
    if row is None or row[0] != tenant:
        raise NotFound("dataset")
    if row[1] is None:
        raise Conflict("dataset is not fitted yet: POST /v1/datasets/{id}/fit and wait for the job to succeed")
    return row[1], FitFiles.of(ctx.settings.data_dir, dataset_id, row[1])


def scores_page(
    fit_id: str, files: FitFiles, *, limit: int, cursor: str | None, order: str, label: str | None
) -> dict[str, Any]:
    """One page of a fit's scores (``files`` from :func:`current_fit`): a binary search and a
    slice of memory-mapped files, no database."""
    position = Cursor.decode(cursor) if cursor else None
    items, next_cursor = page(files.directory, limit=limit, cursor=position, descending=order == "desc", label=label)
    # Plain dict (ScorePage's shape): score pages are the hot path, skip re-validating rows.
    return {"items": items, "next_cursor": next_cursor, "fit_id": fit_id}


def label_issue_report(
    ctx: AppContext, tenant: str, dataset_id: str, *, limit: int, cursor: str | None, flagged_only: bool
) -> schemas.LabelIssuePage:
    """The current fit's label issues, most likely first, each with the IDs of its nearest
    neighbors that carry another label (the evidence a person checks)."""
    fit_id, files = current_fit_files(ctx, tenant, dataset_id)
    if not has_label_issues(files.directory):
        raise Conflict("this fit has no label-issue fields (it predates them): POST /v1/datasets/{id}/fit again")
    threshold = DEFAULT_THRESHOLD
    items, next_cursor = label_issue_page(
        files.directory,
        limit=limit,
        cursor=Cursor.decode(cursor) if cursor else None,
        flagged_only=flagged_only,
        threshold_log_odds=float(np.log(threshold / (1.0 - threshold))),
    )
    if items:
        index = ctx.indexes.get(fit_id, layout.store_dir(ctx.settings.data_dir, dataset_id), files.num_chunks())
        for item in items:
            neighbors = index.neighbors(item["sample_id"], ctx.settings.knn_k) if item["sample_id"] in index.row_of else []
            item["disagreeing_neighbors"] = [n["sample_id"] for n in neighbors if n["label"] != item["label"]]
    return schemas.LabelIssuePage(items=items, next_cursor=next_cursor, fit_id=fit_id, threshold=threshold)


def summary(ctx: AppContext, tenant: str, dataset_id: str) -> schemas.Summary:
    fit, _ = current_fit(ctx, tenant, dataset_id)
    return schemas.Summary(fit_id=fit.id, classes=fit.summary)


def neighbors(ctx: AppContext, tenant: str, dataset_id: str, sample_id: str, k: int) -> schemas.Neighbors:
    fit_id, files = current_fit_files(ctx, tenant, dataset_id)
    index = ctx.indexes.get(fit_id, layout.store_dir(ctx.settings.data_dir, dataset_id), files.num_chunks())
    if sample_id not in index.row_of:
        raise NotFound("sample")
    label = str(index.labels[index.row_of[sample_id]]) or None
    return schemas.Neighbors(fit_id=fit_id, sample_id=sample_id, label=label, neighbors=index.neighbors(sample_id, k))


def failures(ctx: AppContext, tenant: str, dataset_id: str, limit: int) -> schemas.Failures:
    require_dataset(ctx, tenant, dataset_id)
    rows = EmbeddingStore(layout.store_dir(ctx.settings.data_dir, dataset_id)).failures()
    items = [schemas.Failure(sample_id=sample_id, reason=reason) for sample_id, reason in rows[:limit]]
    return schemas.Failures(count=len(rows), items=items)


def score_new(
    ctx: AppContext, tenant: str, dataset_id: str, form: Form
) -> schemas.NewScores | schemas.JobAccepted:
    """Score items that are not part of the dataset against its fitted Gaussians: embeddings
    here and now (a matrix product); an image archive as a job (202), whose result is read at
    ``GET /v1/jobs/{job_id}/result``."""
    try:
        fit, _ = current_fit(ctx, tenant, dataset_id)
        if "file" in form.files and "embeddings" not in form.files:
            return _queue_archive(ctx, tenant, fit, form)
        if "embeddings" not in form.files:
            raise InvalidInput("send multipart field 'embeddings' (.npy, optional 'labels', 'ids') or 'file' (an archive)")
        model = ctx.model(dataset_id, fit.id)
        features = load_embeddings(form.files["embeddings"])
        labels = load_labels(form.files["labels"]) if "labels" in form.files else None
        ids = load_ids(form.files["ids"]) if "ids" in form.files else None
        if labels is not None:
            check_lengths(features.shape[0], labels, ids)
        elif ids is not None and len(ids) != features.shape[0]:
            raise InvalidInput(f"{features.shape[0]} embeddings but {len(ids)} ids: counts must match")
        ids = ids or [str(i) for i in range(features.shape[0])]
        if features.shape[0] > ctx.settings.score_max_items:
            raise TooLarge(f"at most {ctx.settings.score_max_items} items per scoring request (DIFFICULTY_SCORE_MAX_ITEMS)")
        items = score_table(model, features, labels, ids).to_pylist()
        return schemas.NewScores(fit_id=fit.id, items=items, failures=[])
    finally:
        form.discard()


def _queue_archive(ctx: AppContext, tenant: str, fit: Fit, form: Form) -> schemas.JobAccepted:
    """Check the archive as an upload is checked, move it into a scoring job's folder and queue
    the job in one transaction; nothing is decoded here."""
    if not is_image_encoder(fit.encoder):
        raise Conflict("this dataset was fitted on precomputed embeddings: send 'embeddings', not an archive")
    members = inspect_archive(
        form.files["file"], max_members=ctx.settings.score_max_items, max_total_bytes=ctx.settings.max_archive_bytes
    )
    if not members:
        raise InvalidInput("the archive holds no image")
    # The operator's allow-list as it is now (an encoder removed from it is not loaded again).
    check_tenant_encoder(fit.encoder, allowed_encoders(ctx))
    with ctx.db() as session:
        # A concurrent DELETE of the dataset: lock its row until the commit (as uploads do).
        dataset = session.scalar(select(Dataset).where(Dataset.id == fit.dataset_id).with_for_update())
        if dataset is None or dataset.tenant != tenant:
            raise NotFound("dataset")
        if dataset.current_fit_id != fit.id:
            raise Conflict("the dataset was fitted again meanwhile: send the archive again")
        check_active_jobs_quota(ctx, session, tenant)
        try:
            job = queue.enqueue(
                session,
                dataset_id=dataset.id,
                tenant=tenant,
                kind=JobKind.SCORE,
                options={"fit_id": fit.id, "num_items": len(members)},
            )
        except queue.JobConflict as exc:
            raise Conflict(f"a job is already queued or running for this dataset: {exc.job_id} (one job per "
                           "dataset at a time: wait for it, or cancel it)") from None
        files = ScoringFiles(layout.scoring_dir(ctx.settings.data_dir, dataset.id, job.id))
        try:
            files.accept(form.files["file"])
            session.commit()
        except Exception:
            session.rollback()
            files.remove()
            raise
        return schemas.JobAccepted(job_id=job.id, state=job.state)


def scoring_result(
    ctx: AppContext, tenant: str, job_id: str, *, limit: int, cursor: str | None
) -> tuple[schemas.ScoringResult | None, ScoringFiles]:
    """A succeeded archive scoring's result: one JSON page (``limit`` None: only the files,
    for the whole-table export). Another tenant's job is a missing one."""
    with ctx.db() as session:
        job = owned_job(session, tenant, job_id)
        kind, state, error, result, dataset_id = job.kind, job.state, job.error, job.result or {}, job.dataset_id
    if kind != JobKind.SCORE:
        raise NotFound("scoring result (this job is a fit: its scores are GET /v1/datasets/{id}/scores)")
    if state != JobState.SUCCEEDED:
        detail = f": {error}" if error else ": poll GET /v1/jobs/{job_id} until it succeeded"
        raise Conflict(f"the scoring job is {state}{detail}")
    files = ScoringFiles(layout.scoring_dir(ctx.settings.data_dir, dataset_id, job_id))
    if not files.has_result():  # the dataset was deleted since
        raise NotFound("scoring result")
    if limit is None:
        return None, files
    items, next_cursor = files.page(limit=limit, cursor=cursor)
    failures = [schemas.Failure(sample_id=a, reason=b) for a, b in files.failures()[:MAX_LISTED_FAILURES]] if cursor is None else []
    return schemas.ScoringResult(
        job_id=job_id,
        fit_id=str(result.get("fit_id", "")),
        num_scored=files.num_rows(),
        num_failed=int(result.get("num_failed", 0)),
        items=items,
        next_cursor=next_cursor,
        failures=failures,
    ), files
