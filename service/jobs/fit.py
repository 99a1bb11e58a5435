"""The fit job: embed what is not embedded yet, fit the Gaussians, score, publish the fit.

Resumable at chunk granularity: every chunk in the embedding store is durable (atomic file), an
upload's rows map to chunks deterministically, and image embedding skips IDs already stored. A
worker that takes over an expired lease re-runs this function and continues where the store
ends. Statistics are cached per chunk prefix (pipeline.fitting), so a refit after an append only
reads new chunks for statistics.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from service.jobs import queue
from service.jobs.context import JobContext, JobFailed, JobStopped
from service.pipeline.fitting import labelled_statistics, score_store
from service.settings import Settings
from service.statistics import FitError, fit_gaussians
from service.storage import layout
from service.storage.database import Dataset, Fit, Job, Upload, new_id, utcnow
from service.storage.embeddings import EmbeddingStore
from service.storage.files import atomic_savez, atomic_write_bytes
from service.storage.scores import class_summary, write_score_files

if TYPE_CHECKING:  # the image pipeline (torch) is imported only by jobs that embed images
    from service.ingest.sample import Sample
    from service.pipeline.embedding import EmbedReport

log = logging.getLogger(__name__)

IMAGE_ENCODER_PREFIXES = ("open_clip:",)
IMAGE_ENCODERS = ("efficientnet-lite0",)


def is_image_encoder(name: str) -> bool:
    return name in IMAGE_ENCODERS or name.startswith(IMAGE_ENCODER_PREFIXES)


def check_encoder_name(name: str) -> None:
    """Cheap validation at dataset creation (loading weights happens in the job)."""
    if name.startswith("open_clip:"):
        parts = name.split(":", 2)
        if len(parts) != 3 or not parts[1] or not parts[2]:
            raise ValueError(
                f"encoder {name!r} is malformed: use open_clip:<model>:<pretrained tag or checkpoint path>, "
                "e.g. open_clip:ViT-B-16:openai"
            )
    elif not name or len(name) > 200 or any(c.isspace() for c in name):
        raise ValueError(
            f"encoder {name!r} is not valid: use open_clip:<model>:<tag>, efficientnet-lite0, "
            "or a short name (no spaces) for precomputed embeddings"
        )


def run_fit_job(job: Job, ctx: JobContext, settings: Settings, db: sessionmaker) -> dict[str, Any]:
    with db() as session:
        dataset = session.get(Dataset, job.dataset_id)
        if dataset is None:
            raise JobFailed("the dataset was deleted")
        encoder_name = dataset.encoder
        uploads = session.scalars(
            select(Upload).where(Upload.dataset_id == dataset.id).order_by(Upload.id)
        ).all()
    root = layout.dataset_dir(settings.data_dir, job.dataset_id)
    store = EmbeddingStore(layout.store_dir(settings.data_dir, job.dataset_id))
    options = job.options or {}
    normalize = bool(options.get("normalize", True))
    shrinkage = options.get("shrinkage", "auto")

    pending = [u for u in uploads if u.state == "pending"]
    total = sum(u.num_items for u in pending)
    ctx.set_stage("embedding", total)
    weights_sha256: str | None = None
    encoder = None
    done = 0
    failures = 0
    for upload in pending:
        if upload.kind == "embeddings":
            embedded = _ingest_embeddings(upload, root, store, ctx, settings, db, done)
            failed = 0
        else:
            if encoder is None and settings.executor == "local":
                encoder = load_image_encoder(encoder_name, settings)
            elif settings.executor == "ray":
                check_image_encoder_name(encoder_name)
            embedded, failed = _ingest_archive(upload, root, store, encoder, encoder_name, ctx, settings, done)
        _mark_embedded(db, upload.id, embedded, failed)
        done += upload.num_items
        failures += failed
        ctx.progress(done)
    if is_image_encoder(encoder_name):
        # The store records the encoder that made its features (whichever executor ran it);
        # load the model here only when there is no record yet.
        from service.pipeline.embedding import read_encoder_record

        record = read_encoder_record(store.directory)
        if record is not None:
            weights_sha256 = record.get("weights_sha256")
        else:
            if encoder is None:
                encoder = load_image_encoder(encoder_name, settings)
            weights_sha256 = getattr(encoder, "weights_sha256", None)
    ctx.check()

    num_chunks = len(store.chunk_indices())
    if num_chunks == 0:
        raise JobFailed("the dataset has no items: upload an archive or embeddings first")
    ctx.set_stage("fitting", num_chunks)
    try:
        stats = labelled_statistics(store, normalize=normalize, progress=lambda d, t: ctx.progress(d, t))
        ctx.check()
        model = fit_gaussians(stats, shrinkage, normalized=normalize)
    except FitError as exc:
        raise JobFailed(str(exc)) from None
    except ValueError as exc:
        raise JobFailed(f"cannot fit: {exc}") from None
    ctx.check()
    ctx.set_stage("scoring", model.count)
    scores = score_store(model, store, progress=lambda d, t: ctx.progress(d, t))
    ctx.check()
    knn_k: int | None = None
    if scores.num_rows <= settings.knn_max_items:
        ctx.set_stage("neighbors", scores.num_rows)
        agreement = _knn_column(store, settings.knn_k)
        knn_k = min(settings.knn_k, max(scores.num_rows - 1, 0))
        ctx.progress(scores.num_rows)
    else:
        # Exact kNN is O(N^2 D): beyond the limit the column is null rather than hours of work.
        agreement = np.full(scores.num_rows, np.nan)
    scores = scores.append_column("knn_agreement", pa.array(agreement, pa.float64(), from_pandas=True))
    ctx.check()

    ctx.set_stage("publishing", None)
    fit_id = new_id()
    directory = layout.fit_dir(settings.data_dir, job.dataset_id, fit_id)
    atomic_savez(directory / "model.npz", model.to_arrays())
    write_score_files(directory, scores)
    atomic_write_bytes(directory / "meta.json", json.dumps({"num_chunks": num_chunks}).encode())
    summary = class_summary(scores)
    num_scored = scores.num_rows
    del scores
    result = {
        "fit_id": fit_id,
        "num_scored": num_scored,
        "num_failed": failures,
        "shrinkage": model.shrinkage,
        "shrinkage_agnostic": model.shrinkage_agnostic,
        "executor": settings.executor if pending and any(u.kind != "embeddings" for u in pending) else None,
    }
    with db() as session:
        dataset = session.get(Dataset, job.dataset_id)
        if dataset is None:
            shutil.rmtree(directory, ignore_errors=True)
            raise JobFailed("the dataset was deleted while fitting")
        session.add(
            Fit(
                id=fit_id,
                dataset_id=dataset.id,
                job_id=job.id,
                created_at=utcnow(),
                normalize=normalize,
                shrinkage_requested=shrinkage,
                shrinkage=float(model.shrinkage),
                shrinkage_agnostic=float(model.shrinkage_agnostic),
                encoder=encoder_name,
                weights_sha256=weights_sha256,
                num_scored=num_scored,
                dim=model.dim,
                knn_k=knn_k,
                summary=summary,
            )
        )
        dataset.current_fit_id = fit_id
        final = ctx.snapshot()
        final.update(stage="done", done=num_scored, total=num_scored, eta_seconds=0)
        owned = queue.finish(
            db, job.id, ctx.owner, "succeeded", result=result, progress=final, session=session
        )
        if not owned:
            session.rollback()
            shutil.rmtree(directory, ignore_errors=True)
            ctx.lease_lost = True
            ctx.check()
        session.commit()
    return result


def _knn_column(store: EmbeddingStore, k: int) -> np.ndarray:
    from service.knn import knn_agreement, read_unit_features

    _, labels, features = read_unit_features(store, labelled_only=True)
    return knn_agreement(features, labels, k)


def _mark_embedded(db: sessionmaker, upload_id: int, embedded: int, failed: int) -> None:
    with db() as session:
        upload = session.get(Upload, upload_id)
        if upload is not None:
            upload.state = "embedded"
            upload.num_embedded = embedded
            upload.num_failed = failed
            session.commit()


def _ingest_embeddings(
    upload: Upload,
    root: Path,
    store: EmbeddingStore,
    ctx: JobContext,
    settings: Settings,
    db: sessionmaker,
    done_before: int,
) -> int:
    """Copy an uploaded matrix into the store in chunks; resumes after the last chunk present."""
    from service.ingest.features import load_embeddings

    folder = root / upload.path
    if upload.first_chunk is None:
        with db() as session:
            row = session.get(Upload, upload.id)
            assert row is not None
            row.first_chunk = store.next_index()
            row.chunk_rows = settings.chunk_rows
            session.commit()
            upload.first_chunk, upload.chunk_rows = row.first_chunk, row.chunk_rows
    first, rows = int(upload.first_chunk), int(upload.chunk_rows or settings.chunk_rows)
    features = load_embeddings(folder / "embeddings.npy")  # memory-mapped
    labels = np.load(folder / "labels.npy", allow_pickle=False)
    ids = np.load(folder / "ids.npy", allow_pickle=False) if (folder / "ids.npy").exists() else None
    n = features.shape[0]
    n_chunks = -(-n // rows)
    present = set(store.chunk_indices())
    for k in range(n_chunks):
        index = first + k
        start, stop = k * rows, min((k + 1) * rows, n)
        if index in present:
            ctx.progress(done_before + stop)
            continue
        chunk_ids = ids[start:stop] if ids is not None else np.arange(start, stop).astype(str)
        store.write_chunk(index, chunk_ids.tolist(), labels[start:stop].tolist(), np.asarray(features[start:stop]))
        ctx.progress(done_before + stop)
        ctx.chunk_finished()
    return n


def check_image_encoder_name(name: str) -> None:
    if not is_image_encoder(name):
        raise JobFailed(
            f"the dataset's encoder {name!r} names precomputed embeddings; images need an image encoder "
            "(open_clip:<model>:<tag> or efficientnet-lite0): create a dataset with one"
        )


def load_image_encoder(name: str, settings: Settings):  # type: ignore[no-untyped-def]
    check_image_encoder_name(name)
    try:
        from service.encoders import EncoderError, load_encoder
    except ImportError as exc:
        raise JobFailed(f"image encoders are not available in this installation: {exc}") from None
    try:
        return load_encoder(name, device=settings.device)
    except EncoderError as exc:
        raise JobFailed(str(exc)) from None


def _ingest_archive(
    upload: Upload,
    root: Path,
    store: EmbeddingStore,
    encoder: object,
    encoder_name: str,
    ctx: JobContext,
    settings: Settings,
    done_before: int,
) -> tuple[int, int]:
    from service.ingest import open_source
    from service.pipeline.embedding import embed_source

    source = open_source(root / upload.path / "archive")
    chunks_before = store.next_index()

    def progress(done: int, total: int | None) -> None:
        ctx.progress(done_before + done)
        if ctx.chunk_delay_seconds > 0:
            # Test setting: pause after each new chunk (a resume point), as for embeddings.
            nonlocal chunks_before
            now = store.next_index()
            if now != chunks_before:
                chunks_before = now
                time.sleep(ctx.chunk_delay_seconds)

    if settings.executor == "ray":
        report = _embed_on_ray(source, encoder_name, store, upload.num_items, settings, ctx, progress)
    else:
        report = embed_source(
            source,
            encoder,
            store,
            total=upload.num_items,
            chunk_size=settings.image_chunk_rows,
            progress=progress,
            should_stop=ctx.should_stop,
        )
    if report.stopped:
        ctx.check()  # raises JobStopped: cancelled or lease lost
    return int(report.embedded) + int(report.skipped_existing), len(report.failures)


def _embed_on_ray(
    source: Iterable[Sample],
    encoder_name: str,
    store: EmbeddingStore,
    total: int,
    settings: Settings,
    ctx: JobContext,
    progress: Callable[[int, int | None], None],
) -> EmbedReport:
    """The same embedding on a Ray cluster; the store ends up as the local executor leaves it."""
    try:
        from service.pipeline.ray_executor import RaySettings, embed_source_ray
    except ImportError as exc:
        raise JobFailed(f"DIFFICULTY_EXECUTOR=ray needs the ray extra (pip install '.[ray]'): {exc}") from None
    try:
        return embed_source_ray(
            source,
            encoder_name,
            store,
            total=total,
            chunk_size=settings.image_chunk_rows,
            device=settings.device,
            settings=RaySettings(address=settings.ray_address, num_actors=settings.ray_actors),
            progress=progress,
            should_stop=ctx.should_stop,
        )
    except (JobFailed, JobStopped):
        raise
    except Exception as exc:  # a RayTaskError wraps the actor's own error (e.g. missing weights)
        cause = getattr(exc, "cause", None) or exc
        raise JobFailed(f"embedding on Ray failed: {type(cause).__name__}: {cause}") from None
