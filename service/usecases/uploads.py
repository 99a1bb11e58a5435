"""Uploads: an archive of images, or precomputed embeddings with labels (and IDs).

A request body is spooled under the data dir, checked whole, moved into the dataset's folder by
one rename and recorded in one transaction: a refused upload leaves nothing behind, and no
upload is half there.
"""

from __future__ import annotations

import errno
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from service import schemas
from service.domain import UploadKind, UploadState
from service.encoders.names import check_features_name, is_image_encoder
from service.errors import Conflict, InsufficientStorage, InvalidInput, NotFound, TooLarge
from service.ingest.features import check_lengths, load_embeddings, load_ids, load_labels
from service.ingest.safety import inspect_archive
from service.settings import Settings
from service.statistics.folds import N_FOLDS
from service.storage import layout
from service.storage.database import Dataset, Upload, new_id, utcnow
from service.storage.files import fsync_dir, fsync_tree
from service.storage.uploads import UploadFiles
from service.usecases.context import AppContext
from service.usecases.datasets import class_counts, owned
from service.usecases.forms import Form

PRECOMPUTED = "precomputed"  # the encoder name of embeddings uploaded without one


def _storage_error(exc: OSError) -> Exception:
    # A full disk (or quota) while the upload is stored is the server's condition, not a bug:
    # 507, and nothing of the upload is kept (the spool is discarded, the commit not reached).
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientStorage("the data directory is full: the upload was not stored")
    return exc


def spool_dir(ctx: AppContext) -> Path:
    return layout.spool_dir(ctx.settings.data_dir, new_id())


def _uploads(session: Session, dataset: Dataset) -> list[Upload]:
    return list(session.scalars(select(Upload).where(Upload.dataset_id == dataset.id)).all())


def _check_duplicates(ctx: AppContext, dataset: Dataset, uploads: list[Upload], new_ids: np.ndarray) -> None:
    for upload in uploads:
        old = UploadFiles(layout.upload_dir(ctx.settings.data_dir, dataset.id, upload.path)).ids(upload.num_items)
        clash = new_ids[np.isin(new_ids, old)]
        if clash.size:
            raise Conflict(
                f"{clash.size} sample IDs already exist in this dataset (first: {clash[:3].tolist()}); "
                "IDs must be unique (for embeddings without 'ids' the row index is the ID: pass 'ids')"
            )


def check_data_shape(settings: Settings, num_items: int, dim: int | None, classes: Counter[str] | set[str]) -> None:
    """Refuse a dataset shape the fit cannot hold: D above DIFFICULTY_MAX_DIM, K above
    DIFFICULTY_MAX_CLASSES, more than 16 classes with fewer than 1/DIFFICULTY_MAX_CLASS_FRACTION
    samples per class on average (K close to N), or running sums over DIFFICULTY_MAX_FIT_BYTES.
    The fit holds N_FOLDS x (K x D + D x D) float64 sums: (10, 40000) would mean ~64 GB.
    ``dim`` None: images, whose encoder fixes D."""
    k = len(classes)
    if dim is not None and dim > settings.max_dim:
        raise TooLarge(f"embeddings have D={dim} dimensions; the limit is {settings.max_dim} (DIFFICULTY_MAX_DIM)")
    if k > settings.max_classes:
        raise TooLarge(f"the dataset would have {k} classes; the limit is {settings.max_classes} (DIFFICULTY_MAX_CLASSES)")
    if k > max(16, settings.max_class_fraction * num_items):
        raise InvalidInput(
            f"{k} classes for {num_items} samples: more than {settings.max_class_fraction:g} classes per sample "
            "(DIFFICULTY_MAX_CLASS_FRACTION); a class needs samples to have a distribution"
        )
    if dim is not None:
        need = 8 * N_FOLDS * (k * dim + dim * dim)
        if need > settings.max_fit_bytes:
            raise TooLarge(
                f"a fit of K={k} classes in D={dim} dimensions needs {need} bytes of running sums; the limit "
                f"is {settings.max_fit_bytes} bytes (DIFFICULTY_MAX_FIT_BYTES)"
            )


def dataset_shape(ctx: AppContext, dataset: Dataset, uploads: list[Upload]) -> tuple[int, int | None, set[str]]:
    """(N, D or None for images, class names) of a dataset's committed uploads."""
    classes: set[str] = set()
    for upload in uploads:
        classes.update(upload.classes or {})
    dim = None
    embedded = [u for u in uploads if u.kind == UploadKind.EMBEDDINGS]
    if embedded:
        dim = UploadFiles(layout.upload_dir(ctx.settings.data_dir, dataset.id, embedded[0].path)).embedding_dim()
    return sum(u.num_items for u in uploads), dim, classes


def _gone(ctx: AppContext, dataset_id: str) -> bool:
    with ctx.db() as session:
        return session.get(Dataset, dataset_id) is None


def _check_upload_quota(ctx: AppContext, uploads: list[Upload]) -> None:
    # Each upload is read back for every later duplicate-ID check: their number is bounded.
    if len(uploads) >= ctx.settings.max_uploads_per_dataset:
        raise TooLarge(
            f"this dataset has {len(uploads)} uploads, the limit (DIFFICULTY_MAX_UPLOADS_PER_DATASET): "
            "upload larger batches, or into a new dataset"
        )


def _commit(
    ctx: AppContext, session: Session, dataset: Dataset, form: Form, kind: UploadKind, num_items: int, classes: Counter[str]
) -> schemas.UploadOut:
    # A DELETE of the dataset may run concurrently. Lock its row until the commit (PostgreSQL;
    # SQLite serialises writers anyway): a delete that already won leaves nothing to rename
    # into, one that comes later waits and then removes this upload with the dataset.
    if session.scalar(select(Dataset.id).where(Dataset.id == dataset.id).with_for_update()) is None:
        raise NotFound("dataset")
    folder = layout.new_upload_folder(new_id())
    target = layout.upload_dir(ctx.settings.data_dir, dataset.id, folder)
    target.parent.mkdir(parents=True, exist_ok=True)
    fsync_tree(form.directory)  # the files are on disk before they are recorded
    form.directory.rename(target)  # same file system (both under the data dir): atomic
    fsync_dir(target.parent)
    try:
        upload = Upload(
            dataset_id=dataset.id,
            kind=kind,
            path=folder,
            num_items=num_items,
            classes=dict(classes),
            state=UploadState.PENDING,
            num_embedded=0,
            num_failed=0,
            created_at=utcnow(),
        )
        session.add(upload)
        session.commit()
    except Exception:
        shutil.rmtree(target, ignore_errors=True)
        session.rollback()
        if _gone(ctx, dataset.id):  # deleted between the lock check and the commit (SQLite)
            shutil.rmtree(layout.dataset_dir(ctx.settings.data_dir, dataset.id), ignore_errors=True)
            raise NotFound("dataset") from None
        raise
    return schemas.UploadOut(
        dataset_id=dataset.id,
        upload_id=upload.id,
        kind=kind,
        num_items=num_items,
        classes=class_counts(classes),
        encoder=dataset.encoder,
    )


def accept_archive(ctx: AppContext, tenant: str, dataset_id: str, form: Form) -> schemas.UploadOut:
    try:
        if "file" not in form.files:
            raise InvalidInput("multipart field 'file' (a zip or tar(.gz) archive) is required")
        # The scan reads the whole archive (minutes for GBs): before the dataset's lock and a
        # database connection are taken, as accept_embeddings validates its files first.
        members = inspect_archive(
            form.files["file"],
            max_members=ctx.settings.max_archive_members,
            max_total_bytes=ctx.settings.max_archive_bytes,
        )
        with ctx.upload_lock(dataset_id), ctx.db() as session:
            dataset = owned(session, tenant, dataset_id)
            if not is_image_encoder(dataset.encoder):
                raise Conflict(
                    f"this dataset holds precomputed embeddings ({dataset.encoder!r}); "
                    "create a dataset with an image encoder for images"
                )
            uploads = _uploads(session, dataset)
            _check_upload_quota(ctx, uploads)
            n_old, _, old_classes = dataset_shape(ctx, dataset, uploads)
            check_data_shape(ctx.settings, n_old + len(members), None, old_classes | {m.label for m in members})
            ids = np.asarray([m.name for m in members], dtype=np.str_)
            _check_duplicates(ctx, dataset, uploads, ids)
            UploadFiles(form.directory).put_archive(form.files["file"], ids)
            classes = Counter(m.label for m in members)
            return _commit(ctx, session, dataset, form, UploadKind.ARCHIVE, len(members), classes)
    except OSError as exc:
        raise _storage_error(exc) from None
    finally:
        form.discard()


def accept_embeddings(ctx: AppContext, tenant: str, dataset_id: str, form: Form) -> schemas.UploadOut:
    try:
        if "embeddings" not in form.files or "labels" not in form.files:
            raise InvalidInput("multipart fields 'embeddings' (.npy, N x D) and 'labels' are required")
        features = load_embeddings(form.files["embeddings"])
        # Label and ID files are read line by line, at most one line past the row count.
        labels = load_labels(form.files["labels"], max_count=features.shape[0])
        ids = load_ids(form.files["ids"], max_count=features.shape[0]) if "ids" in form.files else None
        check_lengths(features.shape[0], labels, ids)
        if any(label == "" for label in labels):
            raise InvalidInput("labels must not be empty strings")
        name = form.fields.get("encoder", "").strip() or None
        if name is not None:
            check_features_name(name)
        n, dim = features.shape
        del features
        check_data_shape(ctx.settings, n, dim, set(labels))  # before the lock: this upload alone
        with ctx.upload_lock(dataset_id), ctx.db() as session:
            dataset = owned(session, tenant, dataset_id)
            uploads = _uploads(session, dataset)
            _check_upload_quota(ctx, uploads)
            if any(u.kind == UploadKind.ARCHIVE for u in uploads):
                raise Conflict("this dataset holds images: upload embeddings to a separate dataset")
            if is_image_encoder(dataset.encoder) or (name and not uploads):
                # A fresh dataset takes the name of the embeddings it receives (the default
                # encoder would be wrong for features computed elsewhere).
                if uploads:
                    raise Conflict("this dataset's encoder does not match precomputed embeddings")
                dataset.encoder = name or PRECOMPUTED
            elif name and name != dataset.encoder:
                raise Conflict(f"this dataset holds embeddings named {dataset.encoder!r}, not {name!r}")
            if uploads:
                first = UploadFiles(layout.upload_dir(ctx.settings.data_dir, dataset.id, uploads[0].path))
                if first.embedding_dim() != dim:
                    raise InvalidInput(f"embeddings have D={dim} but this dataset's have D={first.embedding_dim()}")
            n_old, _, old_classes = dataset_shape(ctx, dataset, uploads)
            check_data_shape(ctx.settings, n_old + n, dim, old_classes | set(labels))
            id_array = UploadFiles.ids_or_default(ids, n)
            _check_duplicates(ctx, dataset, uploads, id_array)
            UploadFiles(form.directory).put_embeddings(
                form.files["embeddings"], np.asarray(labels, dtype=np.str_), None if ids is None else id_array
            )
            form.drop("labels")
            form.drop("ids")
            return _commit(ctx, session, dataset, form, UploadKind.EMBEDDINGS, n, Counter(labels))
    except OSError as exc:
        raise _storage_error(exc) from None
    finally:
        form.discard()
