"""Reading a fitted dataset: score pages and exports, the per-class summary, a sample's
neighbors, the items that could not be embedded, and scoring new items against the fit."""

from __future__ import annotations

from typing import Any

import numpy as np
from sqlalchemy import select

from service import schemas
from service.encoders.names import check_tenant_encoder, is_image_encoder
from service.errors import Conflict, InvalidInput, NotFound, TooLarge
from service.ingest.features import check_lengths, load_embeddings, load_ids, load_labels
from service.ingest.safety import inspect_archive
from service.statistics.label_issues import DEFAULT_THRESHOLD
from service.storage import layout
from service.storage.database import Dataset, Fit
from service.storage.embeddings import EmbeddingStore
from service.storage.fits import FitFiles
from service.storage.scores import Cursor, has_label_issues, label_issue_page, page
from service.usecases.context import AppContext
from service.usecases.datasets import MAX_ID_LENGTH, allowed_encoders, require_dataset
from service.usecases.forms import Form


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


def current_fit_files(ctx: AppContext, tenant: str, dataset_id: str) -> tuple[str, FitFiles]:
    """:func:`current_fit` for the score-page hot path: two columns of one row, no ORM objects
    (the Fit row carries the per-class summary, whose JSON would be parsed per request)."""
    if len(dataset_id) > MAX_ID_LENGTH:
        raise NotFound("dataset")
    with ctx.db() as session:
        row = session.execute(
            select(Dataset.tenant, Dataset.current_fit_id).where(Dataset.id == dataset_id)
        ).first()
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


def score_new(ctx: AppContext, tenant: str, dataset_id: str, form: Form) -> schemas.NewScores:
    """Score items that are not part of the dataset against its fitted Gaussians."""
    try:
        fit, _ = current_fit(ctx, tenant, dataset_id)
        model = ctx.model(dataset_id, fit.id)
        failures_out: list[dict[str, str]] = []
        if "embeddings" in form.files:
            features = load_embeddings(form.files["embeddings"])
            labels = load_labels(form.files["labels"]) if "labels" in form.files else None
            ids = load_ids(form.files["ids"]) if "ids" in form.files else None
            if labels is not None:
                check_lengths(features.shape[0], labels, ids)
            elif ids is not None and len(ids) != features.shape[0]:
                raise InvalidInput(f"{features.shape[0]} embeddings but {len(ids)} ids: counts must match")
            ids = ids or [str(i) for i in range(features.shape[0])]
        elif "file" in form.files:
            features, labels, ids, failures_out = _embed_archive(ctx, fit, form)
        else:
            raise InvalidInput("send multipart field 'embeddings' (.npy, optional 'labels', 'ids') or 'file' (an archive)")
        if features.shape[0] > ctx.settings.score_max_items:
            raise TooLarge(f"at most {ctx.settings.score_max_items} items per scoring request (DIFFICULTY_SCORE_MAX_ITEMS)")
        if features.shape[1] != model.dim:
            raise InvalidInput(f"features have D={features.shape[1]} but the fit has D={model.dim}")
        try:
            scored = model.score(np.asarray(features), labels)
        except ValueError as exc:  # labels the fit has never seen
            raise InvalidInput(str(exc)) from None
        items = []
        for i, sample_id in enumerate(ids):
            item: dict[str, Any] = {
                "sample_id": sample_id,
                "md_agnostic": float(scored["md_agnostic"][i]),
                "rmd_min": float(scored["rmd_min"][i]),
                "predicted_label": str(scored["predicted_label"][i]),
            }
            if labels is not None:
                item.update(label=labels[i], rmd=float(scored["rmd"][i]), md_class=float(scored["md_class"][i]))
            items.append(item)
        return schemas.NewScores(fit_id=fit.id, items=items, failures=failures_out)
    finally:
        form.discard()


def _embed_archive(ctx: AppContext, fit: Fit, form: Form):  # type: ignore[no-untyped-def]
    if not is_image_encoder(fit.encoder):
        raise Conflict("this dataset was fitted on precomputed embeddings: send 'embeddings', not an archive")
    members = inspect_archive(
        form.files["file"], max_members=ctx.settings.score_max_items, max_total_bytes=ctx.settings.max_archive_bytes
    )
    # The operator's allow-list as it is now (an encoder removed from it is not loaded again).
    check_tenant_encoder(fit.encoder, allowed_encoders(ctx))
    encoder = ctx.encoder(fit.encoder)
    from service.ingest import open_source
    from service.pipeline.embedding import embed_source

    store = EmbeddingStore(form.directory / "store")
    report = embed_source(open_source(form.files["file"]), encoder, store, total=len(members))
    ids, labels, feats = [], [], []
    for chunk in store.iter_chunks():
        ids += chunk.sample_ids.tolist()
        labels += chunk.labels.tolist()
        feats.append(chunk.features)
    if not feats:
        raise InvalidInput(f"no image in the archive could be decoded ({len(report.failures)} failures)")
    failures_out = [{"sample_id": str(f[0]), "reason": str(f[1])} for f in report.failures]
    return np.concatenate(feats), labels, ids, failures_out
