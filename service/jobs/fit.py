"""The fit job: the fit use case (``pipeline.fit_dataset``) run under a lease, with durable
progress, cancellation, failures a person can act on, and a transactional finish.

Resumable at chunk granularity: every chunk in the embedding store is durable (atomic file), an
upload's rows map to chunks deterministically (its first chunk is recorded before the first is
written), and image embedding skips IDs already stored. A worker that takes over an expired lease
re-runs this function and continues where the store ends.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from service.domain import ExecutorKind, JobStage, JobState, UploadKind, UploadState
from service.encoders.names import EncoderError, is_image_encoder, require_image_encoder
from service.jobs import queue
from service.jobs.context import JobContext, JobFailed, JobStopped
from service.pipeline.fit_dataset import FitSettings, copy_embeddings, fit_and_score, publish
from service.settings import Settings
from service.statistics import FitError
from service.storage import layout
from service.storage.database import Dataset, Fit, Job, Upload, new_id, utcnow
from service.storage.embeddings import EmbeddingStore
from service.storage.fits import FitFiles, remove_fits, retire_superseded
from service.storage.scores import class_summary
from service.storage.uploads import UploadFiles

if TYPE_CHECKING:  # the image pipeline (torch) is imported only by jobs that embed images
    from pathlib import Path

    from service.pipeline.embedding import ChunkExecutor, EmbedReport

log = logging.getLogger(__name__)

# How often a fit stage's progress report reads the job's row for a cancel request.
STOP_POLL_SECONDS = 1.0


class FitStages:
    """The job's :class:`~service.pipeline.fit_dataset.Stages`: progress goes to the job's
    context (published by the heartbeat), and every ``progress()`` call also honours a stop, so a
    cancel or the run-time limit (both flags on the context, set by the heartbeat) ends the fit at
    the next chunk of a stage, not only between stages. The row is read here too, at most every
    STOP_POLL_SECONDS, so a cancel is seen even while the heartbeat has not run."""

    def __init__(self, ctx: JobContext, db: sessionmaker) -> None:
        self.ctx = ctx
        self.db = db
        self._polled = float("-inf")

    def set_stage(self, stage: JobStage, total: int | None) -> None:
        self.ctx.set_stage(stage, total)

    def progress(self, done: int, total: int | None = None) -> None:
        self.ctx.progress(done, total)
        self.check()

    def check(self) -> None:
        now = time.monotonic()
        if now - self._polled >= STOP_POLL_SECONDS:
            self._polled = now
            try:
                owned, cancel = queue.stop_requested(self.db, self.ctx.job_id, self.ctx.owner)
            except Exception:  # the database may be briefly unreachable: the heartbeat decides
                log.warning("job %s: could not read its stop request", self.ctx.job_id, exc_info=True)
            else:
                self.ctx.lease_lost = self.ctx.lease_lost or not owned
                self.ctx.cancel_requested = self.ctx.cancel_requested or cancel
        self.ctx.check()



def run_fit_job(job: Job, ctx: JobContext, settings: Settings, db: sessionmaker) -> dict[str, Any]:
    with db() as session:
        dataset = session.get(Dataset, job.dataset_id)
        if dataset is None:
            raise JobFailed("the dataset was deleted")
        encoder_name = dataset.encoder
        uploads = session.scalars(
            select(Upload).where(Upload.dataset_id == dataset.id).order_by(Upload.id)
        ).all()
    store = EmbeddingStore(layout.store_dir(settings.data_dir, job.dataset_id))
    options = job.options or {}
    try:
        fit_settings = FitSettings(
            normalize=bool(options.get("normalize", True)),
            shrinkage=options.get("shrinkage", "auto"),
            knn_k=settings.knn_k,
            knn_max_items=settings.knn_max_items,
        )
    except FitError as exc:
        raise JobFailed(str(exc)) from None

    pending = [u for u in uploads if u.state == UploadState.PENDING]
    failures = _embed_pending(pending, store, encoder_name, ctx, settings, db)
    weights_sha256 = _weights_sha256(store, encoder_name, settings.device) if is_image_encoder(encoder_name) else None
    ctx.check()
    if not store.chunk_indices():
        raise JobFailed("the dataset has no items: upload an archive or embeddings first")
    try:
        outcome = fit_and_score(store, fit_settings, FitStages(ctx, db))
    except FitError as exc:
        raise JobFailed(str(exc)) from None
    except ValueError as exc:
        raise JobFailed(f"cannot fit: {exc}") from None

    ctx.set_stage(JobStage.PUBLISHING, None)
    fit_id = new_id()
    files = FitFiles.of(settings.data_dir, job.dataset_id, fit_id)
    publish(outcome, files)
    model, num_scored, knn_k, knn_search = outcome.model, outcome.scores.num_rows, outcome.knn_k, outcome.knn_search
    summary = class_summary(outcome.scores)
    del outcome
    images = any(u.kind != UploadKind.EMBEDDINGS for u in pending)
    result = {
        "fit_id": fit_id,
        "num_scored": num_scored,
        "num_failed": failures,
        "shrinkage": model.shrinkage,
        "shrinkage_agnostic": model.shrinkage_agnostic,
        "executor": settings.executor if images else None,
    }
    with db() as session:
        dataset = session.get(Dataset, job.dataset_id)
        if dataset is None:
            files.remove()
            raise JobFailed("the dataset was deleted while fitting")
        session.add(
            Fit(
                id=fit_id,
                dataset_id=dataset.id,
                job_id=job.id,
                created_at=utcnow(),
                normalize=fit_settings.normalize,
                shrinkage_requested=fit_settings.shrinkage,
                shrinkage=float(model.shrinkage),
                shrinkage_agnostic=float(model.shrinkage_agnostic),
                encoder=encoder_name,
                weights_sha256=weights_sha256,
                num_scored=num_scored,
                dim=model.dim,
                knn_k=knn_k,
                knn_search=knn_search,
                summary=summary,
            )
        )
        dataset.current_fit_id = fit_id
        retired = retire_superseded(session, dataset.id, fit_id, settings.keep_fits)
        final = ctx.snapshot()
        final.update(stage=JobStage.DONE, done=num_scored, total=num_scored, eta_seconds=0)
        owned = queue.finish(
            db, job.id, ctx.owner, JobState.SUCCEEDED, result=result, progress=final, session=session
        )
        if not owned:
            session.rollback()
            files.remove()
            ctx.lease_lost = True
            ctx.check()
        session.commit()
    remove_fits(settings.data_dir, job.dataset_id, retired)  # rows gone: a crash here leaves orphans
    return result


def _embed_pending(
    pending: list[Upload], store: EmbeddingStore, encoder_name: str, ctx: JobContext, settings: Settings, db: sessionmaker
) -> int:
    """Every pending upload into the store; returns how many items could not be embedded."""
    ctx.set_stage(JobStage.EMBEDDING, sum(u.num_items for u in pending))
    executor: ChunkExecutor | None = None
    done = failures = 0
    try:
        for upload in pending:
            files = UploadFiles(layout.upload_dir(settings.data_dir, upload.dataset_id, upload.path))
            if upload.kind == UploadKind.EMBEDDINGS:
                embedded, failed = _copy_upload(upload, files, store, ctx, settings, db, done), 0
            else:
                executor = executor or image_executor(encoder_name, settings)
                embedded, failed = _embed_upload(upload, files, store, executor, ctx, settings, done)
            _mark_embedded(db, upload.id, embedded, failed)
            done += upload.num_items
            failures += failed
            ctx.progress(done)
    finally:
        if executor is not None:
            executor.close()
    return failures


def _weights_sha256(store: EmbeddingStore, encoder_name: str, device: str) -> str | None:
    # The store records the encoder that made its features (whichever executor ran it); load
    # the model only when there is no record yet.
    record = store.encoder_record()
    if record is not None:
        return record.get("weights_sha256")
    return getattr(_load_image_encoder(encoder_name, device), "weights_sha256", None)


def _mark_embedded(db: sessionmaker, upload_id: int, embedded: int, failed: int) -> None:
    with db() as session:
        upload = session.get(Upload, upload_id)
        if upload is not None:
            upload.state = UploadState.EMBEDDED
            upload.num_embedded = embedded
            upload.num_failed = failed
            session.commit()


def _copy_upload(
    upload: Upload,
    files: UploadFiles,
    store: EmbeddingStore,
    ctx: JobContext,
    settings: Settings,
    db: sessionmaker,
    done_before: int,
) -> int:
    """Copy an uploaded matrix into the store; resumes after the last chunk present."""
    if upload.first_chunk is None:
        with db() as session:
            row = session.get(Upload, upload.id)
            assert row is not None
            row.first_chunk = store.next_index()
            row.chunk_rows = settings.chunk_rows
            session.commit()
            upload.first_chunk, upload.chunk_rows = row.first_chunk, row.chunk_rows
    features = files.embeddings()
    return copy_embeddings(
        store,
        features,
        files.labels(),
        files.ids(features.shape[0]) if files.has_ids() else None,
        first_chunk=int(upload.first_chunk),
        chunk_rows=int(upload.chunk_rows or settings.chunk_rows),
        progress=lambda stop: ctx.progress(done_before + stop),
        on_chunk=ctx.chunk_finished,
    )


def _load_image_encoder(name: str, device: str):  # type: ignore[no-untyped-def]
    try:
        require_image_encoder(name)
        from service.encoders import load_encoder
    except ImportError as exc:
        raise JobFailed(f"image encoders are not available in this installation: {exc}") from None
    except EncoderError as exc:
        raise JobFailed(str(exc)) from None
    try:
        return load_encoder(name, device=device)
    except EncoderError as exc:
        raise JobFailed(str(exc)) from None


def embed_archive(
    archive: Path,
    executor: ChunkExecutor,
    store: EmbeddingStore,
    ctx: JobContext,
    settings: Settings,
    total: int | None,
    done_before: int = 0,
) -> EmbedReport:
    """Embed an archive's images into ``store`` under the job's lease: progress (offset by
    ``done_before``), cancellation, and the executor's failures as job failures. Shared by the
    fit job (uploads) and the scoring job (an archive to score)."""
    from service.ingest import open_source
    from service.pipeline.embedding import embed_source

    chunks_before = store.next_index()

    def progress(done: int, _total: int | None) -> None:
        ctx.progress(done_before + done)
        if ctx.chunk_delay_seconds > 0:
            # Test setting: pause after each new chunk (a resume point), as for embeddings.
            nonlocal chunks_before
            now = store.next_index()
            if now != chunks_before:
                chunks_before = now
                time.sleep(ctx.chunk_delay_seconds)

    try:
        report = embed_source(
            open_source(archive),
            executor,
            store,
            total=total,
            chunk_size=settings.image_chunk_rows,
            progress=progress,
            should_stop=ctx.should_stop,
        )
    except (JobFailed, JobStopped):
        raise
    except EncoderError as exc:
        raise JobFailed(str(exc)) from None
    except Exception as exc:
        if settings.executor != ExecutorKind.RAY:
            raise
        # A RayTaskError wraps the actor's own error (e.g. missing weights).
        cause = getattr(exc, "cause", None) or exc
        raise JobFailed(f"embedding on Ray failed: {type(cause).__name__}: {cause}") from None
    if report.stopped:
        ctx.check()  # raises JobStopped: cancelled or lease lost
    return report


def image_executor(encoder_name: str, settings: Settings) -> ChunkExecutor:
    """The executor strategy the settings name, for this dataset's encoder."""
    if settings.executor == ExecutorKind.RAY:
        try:
            require_image_encoder(encoder_name)
            from service.pipeline.ray_executor import RayExecutor, RaySettings
        except EncoderError as exc:
            raise JobFailed(str(exc)) from None
        except ImportError as exc:
            raise JobFailed(f"DIFFICULTY_EXECUTOR=ray needs the ray extra (pip install '.[ray]'): {exc}") from None
        return RayExecutor(
            encoder_name,
            device=settings.device,
            settings=RaySettings(address=settings.ray_address, num_actors=settings.ray_actors),
        )
    from service.pipeline.embedding import LocalExecutor

    return LocalExecutor(_load_image_encoder(encoder_name, settings.device))


def _embed_upload(
    upload: Upload,
    files: UploadFiles,
    store: EmbeddingStore,
    executor: ChunkExecutor,
    ctx: JobContext,
    settings: Settings,
    done_before: int,
) -> tuple[int, int]:
    report = embed_archive(files.archive, executor, store, ctx, settings, upload.num_items, done_before)
    return int(report.embedded) + int(report.skipped_existing), len(report.failures)
