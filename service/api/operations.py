"""Service functions behind the routers: one per route, each authorises by tenant, does the
work and returns a wire schema. Routers stay thin (parse, call, serialise)."""

from __future__ import annotations

import json
import shutil
import threading
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from service.api import schemas
from service.api.errors import ApiError, not_found
from service.api.multipart import Form
from service.ingest.features import (
    InputError,
    check_lengths,
    load_embeddings,
    load_ids,
    load_labels,
)
from service.ingest.safety import ArchiveError, inspect_archive
from service.jobs import queue
from service.jobs.fit import check_encoder_name, is_image_encoder
from service.knn import IndexCache
from service.settings import Settings
from service.statistics import GaussianModel
from service.storage import layout
from service.storage.database import Dataset, Fit, Job, Upload, new_id, utcnow
from service.storage.embeddings import read_failures
from service.storage.files import atomic_write, load_npz
from service.storage.scores import Cursor, CursorError, page


@dataclass
class AppContext:
    settings: Settings
    db: sessionmaker
    indexes: IndexCache = field(default_factory=IndexCache)
    _models: OrderedDict[str, GaussianModel] = field(default_factory=OrderedDict)
    _encoders: dict[str, object] = field(default_factory=dict)
    _upload_locks: dict[str, threading.Lock] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _encoder_lock: threading.Lock = field(default_factory=threading.Lock)

    def upload_lock(self, dataset_id: str) -> threading.Lock:
        # Serialises uploads to one dataset in this process (duplicate-ID checks, encoder switch).
        with self._lock:
            return self._upload_locks.setdefault(dataset_id, threading.Lock())

    def encoder(self, name: str) -> object:
        """One loaded image encoder per name, kept for later scoring requests."""
        from service.jobs.fit import load_image_encoder

        # Its own lock: loading weights takes seconds, and uploads and model lookups (which take
        # self._lock) must not wait behind it.
        with self._encoder_lock:
            if name not in self._encoders:
                self._encoders.clear()  # at most one model in memory
                self._encoders[name] = load_image_encoder(name, self.settings)
            return self._encoders[name]

    def model(self, dataset_id: str, fit_id: str) -> GaussianModel:
        with self._lock:
            if fit_id in self._models:
                return self._models[fit_id]
        arrays = load_npz(layout.fit_dir(self.settings.data_dir, dataset_id, fit_id) / "model.npz")
        model = GaussianModel.from_arrays(arrays)
        with self._lock:
            self._models[fit_id] = model
            while len(self._models) > 8:
                self._models.popitem(last=False)
        return model


# --- datasets -------------------------------------------------------------------------------


def _utc(value: datetime | None) -> datetime | None:
    # SQLite hands back naive datetimes; everything stored is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _owned(session: Session, tenant: str, dataset_id: str) -> Dataset:
    dataset = session.get(Dataset, dataset_id) if len(dataset_id) <= 64 else None
    if dataset is None or dataset.tenant != tenant:
        # Other tenants' datasets are indistinguishable from missing ones.
        raise not_found()
    return dataset


def _fit_out(fit: Fit) -> schemas.FitOut:
    return schemas.FitOut(
        id=fit.id,
        created_at=_utc(fit.created_at),
        normalize=fit.normalize,
        shrinkage=fit.shrinkage,
        shrinkage_agnostic=fit.shrinkage_agnostic,
        shrinkage_requested=fit.shrinkage_requested,
        encoder=fit.encoder,
        weights_sha256=fit.weights_sha256,
        num_scored=fit.num_scored,
        dim=fit.dim,
        knn_k=fit.knn_k,
    )


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
        created_at=_utc(dataset.created_at),
        num_items=sum(u.num_items for u in uploads),
        num_embedded=sum(u.num_embedded for u in uploads),
        num_failed=sum(u.num_failed for u in uploads),
        classes=[schemas.ClassCount(label=k, count=v) for k, v in sorted(classes.items())],
        fit=_fit_out(fit) if fit else None,
        active_job_id=active.id if active else None,
    )


def create_dataset(ctx: AppContext, tenant: str, body: schemas.DatasetCreate) -> schemas.Created:
    encoder = body.encoder or ctx.settings.default_encoder
    try:
        check_encoder_name(encoder)
    except ValueError as exc:
        raise ApiError(422, str(exc)) from None
    with ctx.db() as session:
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
    """404 unless the tenant owns the dataset (one primary-key lookup)."""
    with ctx.db() as session:
        _owned(session, tenant, dataset_id)


def get_dataset(ctx: AppContext, tenant: str, dataset_id: str) -> schemas.DatasetOut:
    with ctx.db() as session:
        return _dataset_out(session, _owned(session, tenant, dataset_id))


def delete_dataset(ctx: AppContext, tenant: str, dataset_id: str) -> None:
    with ctx.db() as session:
        dataset = _owned(session, tenant, dataset_id)
        for job_id in session.scalars(select(Job.id).where(Job.dataset_id == dataset.id, Job.state.in_(queue.ACTIVE))):
            queue.request_cancel(session, job_id)
        session.execute(delete(Fit).where(Fit.dataset_id == dataset.id))
        session.execute(delete(Upload).where(Upload.dataset_id == dataset.id))
        session.delete(dataset)
        session.commit()
    shutil.rmtree(layout.dataset_dir(ctx.settings.data_dir, dataset_id), ignore_errors=True)


# --- uploads --------------------------------------------------------------------------------


def spool_dir(ctx: AppContext) -> Path:
    return ctx.settings.tmp_dir / f"upload-{new_id()}"


def _existing_ids(root: Path, uploads: list[Upload]) -> list[np.ndarray]:
    out = []
    for upload in uploads:
        folder = root / upload.path
        if (folder / "ids.npy").exists():
            out.append(np.load(folder / "ids.npy", allow_pickle=False))
        else:
            out.append(np.arange(upload.num_items).astype(str))
    return out


def _check_duplicates(new_ids: np.ndarray, existing: list[np.ndarray]) -> None:
    for old in existing:
        clash = new_ids[np.isin(new_ids, old)]
        if clash.size:
            raise ApiError(
                409,
                f"{clash.size} sample IDs already exist in this dataset (first: {clash[:3].tolist()}); "
                "IDs must be unique (for embeddings without 'ids' the row index is the ID: pass 'ids')",
            )


def _commit_upload(
    ctx: AppContext, session: Session, dataset: Dataset, form: Form, kind: str, num_items: int, classes: Counter[str]
) -> schemas.UploadOut:
    folder_name = f"uploads/{new_id()}"
    target = layout.dataset_dir(ctx.settings.data_dir, dataset.id) / folder_name
    target.parent.mkdir(parents=True, exist_ok=True)
    form.directory.rename(target)  # same file system (both under the data dir): atomic
    try:
        upload = Upload(
            dataset_id=dataset.id,
            kind=kind,
            path=folder_name,
            num_items=num_items,
            classes=dict(classes),
            state="pending",
            num_embedded=0,
            num_failed=0,
            created_at=utcnow(),
        )
        session.add(upload)
        session.commit()
    except Exception:
        shutil.rmtree(target, ignore_errors=True)
        raise
    return schemas.UploadOut(
        dataset_id=dataset.id,
        upload_id=upload.id,
        kind=kind,  # type: ignore[arg-type]
        num_items=num_items,
        classes=[schemas.ClassCount(label=k, count=v) for k, v in sorted(classes.items())],
        encoder=dataset.encoder,
    )


def accept_archive(ctx: AppContext, tenant: str, dataset_id: str, form: Form) -> schemas.UploadOut:
    try:
        if "file" not in form.files:
            raise ApiError(422, "multipart field 'file' (a zip or tar(.gz) archive) is required")
        # The scan reads the whole archive (minutes for GBs): before the dataset's lock and a
        # database connection are taken, as accept_embeddings validates its files first.
        try:
            members = inspect_archive(
                form.files["file"],
                max_members=ctx.settings.max_archive_members,
                max_total_bytes=ctx.settings.max_archive_bytes,
            )
        except ArchiveError as exc:
            raise ApiError(422, f"archive refused: {exc}") from None
        with ctx.upload_lock(dataset_id), ctx.db() as session:
            dataset = _owned(session, tenant, dataset_id)
            if not is_image_encoder(dataset.encoder):
                raise ApiError(
                    409,
                    f"this dataset holds precomputed embeddings ({dataset.encoder!r}); "
                    "create a dataset with an image encoder for images",
                )
            uploads = session.scalars(select(Upload).where(Upload.dataset_id == dataset.id)).all()
            ids = np.asarray([m.name for m in members], dtype=np.str_)
            _check_duplicates(ids, _existing_ids(layout.dataset_dir(ctx.settings.data_dir, dataset.id), list(uploads)))
            form.files["file"].rename(form.directory / "archive")
            atomic_write(form.directory / "ids.npy", lambda fh: np.save(fh, ids, allow_pickle=False))
            classes = Counter(m.label for m in members)
            return _commit_upload(ctx, session, dataset, form, "archive", len(members), classes)
    finally:
        form.discard()


def accept_embeddings(ctx: AppContext, tenant: str, dataset_id: str, form: Form) -> schemas.UploadOut:
    try:
        if "embeddings" not in form.files or "labels" not in form.files:
            raise ApiError(422, "multipart fields 'embeddings' (.npy, N x D) and 'labels' are required")
        try:
            features = load_embeddings(form.files["embeddings"])
            labels = load_labels(form.files["labels"])
            ids = load_ids(form.files["ids"]) if "ids" in form.files else None
            check_lengths(features.shape[0], labels, ids)
        except InputError as exc:
            raise ApiError(422, str(exc)) from None
        if any(label == "" for label in labels):
            raise ApiError(422, "labels must not be empty strings")
        name = form.fields.get("encoder", "").strip() or None
        if name is not None:
            try:
                check_encoder_name(name)
            except ValueError as exc:
                raise ApiError(422, str(exc)) from None
        n, dim = features.shape
        del features
        with ctx.upload_lock(dataset_id), ctx.db() as session:
            dataset = _owned(session, tenant, dataset_id)
            uploads = list(session.scalars(select(Upload).where(Upload.dataset_id == dataset.id)).all())
            root = layout.dataset_dir(ctx.settings.data_dir, dataset.id)
            if any(u.kind == "archive" for u in uploads):
                raise ApiError(409, "this dataset holds images: upload embeddings to a separate dataset")
            if is_image_encoder(dataset.encoder) or (name and not uploads):
                # A fresh dataset takes the name of the embeddings it receives (the default
                # encoder would be wrong for features computed elsewhere).
                if uploads:
                    raise ApiError(409, "this dataset's encoder does not match precomputed embeddings")
                dataset.encoder = name or "precomputed"
            elif name and name != dataset.encoder:
                raise ApiError(409, f"this dataset holds embeddings named {dataset.encoder!r}, not {name!r}")
            for upload in uploads:
                shape = np.load(root / upload.path / "embeddings.npy", mmap_mode="r", allow_pickle=False).shape
                if shape[1] != dim:
                    raise ApiError(422, f"embeddings have D={dim} but this dataset's have D={shape[1]}")
                break
            id_array = np.asarray(ids if ids is not None else np.arange(n).astype(str), dtype=np.str_)
            _check_duplicates(id_array, _existing_ids(root, uploads))
            label_array = np.asarray(labels, dtype=np.str_)
            atomic_write(form.directory / "labels.npy", lambda fh: np.save(fh, label_array, allow_pickle=False))
            if ids is not None:
                atomic_write(form.directory / "ids.npy", lambda fh: np.save(fh, id_array, allow_pickle=False))
            form.files["labels"].unlink()
            form.files["embeddings"].rename(form.directory / "embeddings.npy")
            if "ids" in form.files:
                form.files["ids"].unlink()
            return _commit_upload(ctx, session, dataset, form, "embeddings", n, Counter(labels))
    finally:
        form.discard()


# --- jobs -----------------------------------------------------------------------------------


def _job_out(job: Job) -> schemas.JobOut:
    progress = dict(job.progress or {})
    return schemas.JobOut(
        id=job.id,
        dataset_id=job.dataset_id,
        kind=job.kind,
        state=job.state,  # type: ignore[arg-type]
        stage=job.stage,
        progress=schemas.Progress(**{k: progress.get(k) for k in ("done", "total", "per_second", "eta_seconds") if progress.get(k) is not None}),
        error=job.error,
        result=job.result,
        attempts=job.attempts,
        cancel_requested=job.cancel_requested,
        created_at=_utc(job.created_at),
        started_at=_utc(job.started_at),
        finished_at=_utc(job.finished_at),
    )


def start_fit(ctx: AppContext, tenant: str, dataset_id: str, options: schemas.FitOptions) -> schemas.JobAccepted:
    shrinkage = options.shrinkage
    if shrinkage not in ("auto", "auto-shared") and not 0.0 <= float(shrinkage) <= 1.0:
        raise ApiError(422, f"shrinkage must be 'auto', 'auto-shared' or a number in [0, 1], got {shrinkage}")
    with ctx.db() as session:
        dataset = _owned(session, tenant, dataset_id)
        has_items = session.scalar(select(func.count()).select_from(Upload).where(Upload.dataset_id == dataset.id))
        if not has_items:
            raise ApiError(409, "the dataset has no items: upload an archive (items) or embeddings first")
        try:
            job = queue.enqueue(
                session,
                dataset_id=dataset.id,
                tenant=tenant,
                kind="fit",
                options={"normalize": options.normalize, "shrinkage": shrinkage},
            )
        except queue.JobConflict as exc:
            raise ApiError(409, f"a fit job is already queued or running for this dataset: {exc.job_id}") from None
        session.commit()
        return schemas.JobAccepted(job_id=job.id, state=job.state)


def _owned_job(session: Session, tenant: str, job_id: str) -> Job:
    job = session.get(Job, job_id) if len(job_id) <= 64 else None
    if job is None or job.tenant != tenant:
        raise not_found("job")
    return job


def get_job(ctx: AppContext, tenant: str, job_id: str) -> schemas.JobOut:
    with ctx.db() as session:
        return _job_out(_owned_job(session, tenant, job_id))


def cancel_job(ctx: AppContext, tenant: str, job_id: str) -> schemas.JobOut:
    with ctx.db() as session:
        job = _owned_job(session, tenant, job_id)
        if not queue.request_cancel(session, job.id):
            session.rollback()
            session.refresh(job)
            raise ApiError(409, f"the job already {job.state}")
        session.commit()
        session.refresh(job)
        return _job_out(job)


def list_jobs(ctx: AppContext, tenant: str, dataset_id: str) -> list[schemas.JobOut]:
    with ctx.db() as session:
        dataset = _owned(session, tenant, dataset_id)
        jobs = session.scalars(select(Job).where(Job.dataset_id == dataset.id).order_by(Job.created_at.desc())).all()
        return [_job_out(j) for j in jobs]


# --- scores ---------------------------------------------------------------------------------


def current_fit(ctx: AppContext, tenant: str, dataset_id: str) -> tuple[Fit, Path]:
    # One round trip (the score-page hot path): the dataset's tenant and its current fit.
    if len(dataset_id) > 64:
        raise not_found()
    with ctx.db() as session:
        row = session.execute(
            select(Dataset.tenant, Fit)
            .outerjoin(Fit, Fit.id == Dataset.current_fit_id)
            .where(Dataset.id == dataset_id)
        ).first()
        if row is None or row[0] != tenant:
            raise not_found()
        fit = row[1]
        if fit is None:
            raise ApiError(
                409,
                "dataset is not fitted yet: POST /v1/datasets/{id}/fit and wait for the job to succeed",
            )
        # IDs from the database are our own hex IDs: no path resolution needed here.
        return fit, ctx.settings.datasets_dir / fit.dataset_id / "fits" / fit.id


def scores_page(
    fit_id: str, directory: Path, *, limit: int, cursor: str | None, order: str, label: str | None
) -> dict[str, Any]:
    """One page of a fit's scores (``directory`` from :func:`current_fit`): a binary search and a
    slice of memory-mapped files, no database."""
    try:
        position = Cursor.decode(cursor) if cursor else None
    except CursorError as exc:
        raise ApiError(400, str(exc)) from None
    items, next_cursor = page(directory, limit=limit, cursor=position, descending=order == "desc", label=label)
    # Plain dict (ScorePage's shape): score pages are the hot path, skip re-validating rows.
    return {"items": items, "next_cursor": next_cursor, "fit_id": fit_id}


def summary(ctx: AppContext, tenant: str, dataset_id: str) -> schemas.Summary:
    fit, _ = current_fit(ctx, tenant, dataset_id)
    return schemas.Summary(fit_id=fit.id, classes=fit.summary)


def neighbors(ctx: AppContext, tenant: str, dataset_id: str, sample_id: str, k: int) -> schemas.Neighbors:
    fit, directory = current_fit(ctx, tenant, dataset_id)
    meta = json.loads((directory / "meta.json").read_text())
    index = ctx.indexes.get(fit.id, layout.store_dir(ctx.settings.data_dir, dataset_id), meta["num_chunks"])
    if sample_id not in index.row_of:
        raise not_found("sample")
    label = str(index.labels[index.row_of[sample_id]]) or None
    return schemas.Neighbors(fit_id=fit.id, sample_id=sample_id, label=label, neighbors=index.neighbours(sample_id, k))


def failures(ctx: AppContext, tenant: str, dataset_id: str, limit: int) -> schemas.Failures:
    require_dataset(ctx, tenant, dataset_id)
    rows = read_failures(layout.store_dir(ctx.settings.data_dir, dataset_id))
    items = [schemas.Failure(sample_id=sample_id, reason=reason) for sample_id, reason in rows[:limit]]
    return schemas.Failures(count=len(rows), items=items)


def score_new(ctx: AppContext, tenant: str, dataset_id: str, form: Form) -> schemas.NewScores:
    """Score items that are not part of the dataset against its fitted Gaussians."""
    try:
        fit, _ = current_fit(ctx, tenant, dataset_id)
        model = ctx.model(dataset_id, fit.id)
        failures_out: list[dict[str, str]] = []
        if "embeddings" in form.files:
            try:
                features = load_embeddings(form.files["embeddings"])
                labels = load_labels(form.files["labels"]) if "labels" in form.files else None
                ids = load_ids(form.files["ids"]) if "ids" in form.files else None
                if labels is not None:
                    check_lengths(features.shape[0], labels, ids)
                elif ids is not None and len(ids) != features.shape[0]:
                    raise InputError(f"{features.shape[0]} embeddings but {len(ids)} ids: counts must match")
            except InputError as exc:
                raise ApiError(422, str(exc)) from None
            ids = ids or [str(i) for i in range(features.shape[0])]
        elif "file" in form.files:
            features, labels, ids, failures_out = _embed_archive_for_scoring(ctx, fit, form)
        else:
            raise ApiError(422, "send multipart field 'embeddings' (.npy, optional 'labels', 'ids') or 'file' (an archive)")
        if features.shape[0] > ctx.settings.score_max_items:
            raise ApiError(413, f"at most {ctx.settings.score_max_items} items per scoring request (DIFFICULTY_SCORE_MAX_ITEMS)")
        if features.shape[1] != model.dim:
            raise ApiError(422, f"features have D={features.shape[1]} but the fit has D={model.dim}")
        try:
            scored = model.score(np.asarray(features), labels)
        except ValueError as exc:
            raise ApiError(422, str(exc)) from None
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


def _embed_archive_for_scoring(ctx: AppContext, fit: Fit, form: Form):  # type: ignore[no-untyped-def]
    from service.jobs.context import JobFailed

    if not is_image_encoder(fit.encoder):
        raise ApiError(409, "this dataset was fitted on precomputed embeddings: send 'embeddings', not an archive")
    try:
        members = inspect_archive(
            form.files["file"], max_members=ctx.settings.score_max_items, max_total_bytes=ctx.settings.max_archive_bytes
        )
    except ArchiveError as exc:
        raise ApiError(422, f"archive refused: {exc}") from None
    try:
        encoder = ctx.encoder(fit.encoder)
    except JobFailed as exc:
        raise ApiError(422, str(exc)) from None
    from service.ingest import open_source
    from service.pipeline.embedding import embed_source
    from service.storage.embeddings import EmbeddingStore

    store = EmbeddingStore(form.directory / "store")
    report = embed_source(open_source(form.files["file"]), encoder, store, total=len(members))
    ids, labels, feats = [], [], []
    for chunk in store.iter_chunks():
        ids += chunk.sample_ids.tolist()
        labels += chunk.labels.tolist()
        feats.append(chunk.features)
    if not feats:
        raise ApiError(422, f"no image in the archive could be decoded ({len(report.failures)} failures)")
    failures_out = [{"sample_id": str(f[0]), "reason": str(f[1])} for f in report.failures]
    return np.concatenate(feats), labels, ids, failures_out
