"""The archive-scoring job: images sent to ``POST /v1/datasets/{id}/score`` embedded with the
fit's encoder and scored against its Gaussians, under a lease, with the fit job's progress model
(stage, done/total, rate, ETA), cancellation and take-over.

The request only checks and stores the archive (``ScoringFiles.accept``) and queues this job; no
image is decoded and no encoder or thread pool is created in the API process. Resumable: the
archive's embeddings go into the job's own store, so a worker that takes over an expired lease
continues after the last chunk. The archive and its embeddings are removed once the job reaches a
final state (:func:`release_inputs`), whatever that state is; the result stays until the dataset
is deleted.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pyarrow as pa
from sqlalchemy.orm import sessionmaker

from service.domain import FINAL_JOB_STATES, JobKind, JobStage, JobState
from service.errors import InvalidInput
from service.jobs import queue
from service.jobs.context import JobContext, JobFailed
from service.settings import Settings
from service.statistics import GaussianModel
from service.storage import layout
from service.storage.database import Dataset, Fit, Job
from service.storage.embeddings import EmbeddingStore
from service.storage.fits import FitFiles
from service.storage.scorings import ScoringFiles

log = logging.getLogger(__name__)


def score_table(model: GaussianModel, features: np.ndarray, labels: list[str] | None, ids: list[str]) -> pa.Table:
    """New items' scores against a fit, one row per item (the columns of ``NewItemScore``): the
    one mapping from the model's output to what a scoring answers, for the synchronous
    embeddings path and this job alike. Labels the fit has never seen: ``InvalidInput``."""
    if features.shape[1] != model.dim:
        raise InvalidInput(f"features have D={features.shape[1]} but the fit has D={model.dim}")
    try:
        scored = model.score(np.asarray(features), labels)
    except ValueError as exc:  # labels the fit has never seen
        raise InvalidInput(str(exc)) from None
    columns: dict[str, Any] = {"sample_id": pa.array(ids, pa.string())}
    if labels is not None:
        columns["label"] = pa.array(labels, pa.string())
        columns["rmd"] = pa.array(np.asarray(scored["rmd"], dtype=np.float64))
        columns["md_class"] = pa.array(np.asarray(scored["md_class"], dtype=np.float64))
    columns["md_agnostic"] = pa.array(np.asarray(scored["md_agnostic"], dtype=np.float64))
    columns["rmd_min"] = pa.array(np.asarray(scored["rmd_min"], dtype=np.float64))
    columns["predicted_label"] = pa.array([str(x) for x in scored["predicted_label"]], pa.string())
    return pa.table(columns)


def scoring_files(settings: Settings, job: Job) -> ScoringFiles:
    return ScoringFiles(layout.scoring_dir(settings.data_dir, job.dataset_id, job.id))


def run_score_job(job: Job, ctx: JobContext, settings: Settings, db: sessionmaker) -> dict[str, Any]:
    options = job.options or {}
    with db() as session:
        if session.get(Dataset, job.dataset_id) is None:
            raise JobFailed("the dataset was deleted")
        fit = session.get(Fit, str(options.get("fit_id", "")))
        if fit is None:
            raise JobFailed("the fit this scoring was queued for no longer exists: send the archive again")
        fit_id, encoder_name, weights_sha256 = fit.id, fit.encoder, fit.weights_sha256
    files = scoring_files(settings, job)
    if not files.archive.exists():
        raise JobFailed("the archive of this scoring is gone (the job ended before): send the archive again")
    store = EmbeddingStore(files.store_dir)
    total = int(options.get("num_items") or 0) or None

    ctx.set_stage(JobStage.EMBEDDING, total)
    _embed(files, store, encoder_name, total, ctx, settings)
    record = store.encoder_record() or {}
    if weights_sha256 and record.get("weights_sha256") not in (None, weights_sha256):
        raise JobFailed(f"the encoder {encoder_name!r} now has other weights than the fit used: fit the dataset again")
    ctx.check()

    ids: list[str] = []
    labels: list[str] = []
    feats = []
    for chunk in store.iter_chunks():
        ids += chunk.sample_ids.tolist()
        labels += chunk.labels.tolist()
        feats.append(chunk.features)
    failures = store.failures()
    if not feats:
        raise JobFailed(f"no image in the archive could be decoded ({len(failures)} failures)")
    ctx.set_stage(JobStage.SCORING, len(ids))
    try:
        model = GaussianModel.from_arrays(FitFiles.of(settings.data_dir, job.dataset_id, fit_id).model_arrays())
    except FileNotFoundError:
        raise JobFailed("the fit this scoring was queued for was removed: send the archive again") from None
    try:
        table = score_table(model, np.concatenate(feats), labels, ids)
    except InvalidInput as exc:
        raise JobFailed(str(exc)) from None
    del feats
    ctx.check()
    files.write_result(table, failures)
    result = {"fit_id": fit_id, "num_scored": table.num_rows, "num_failed": len(failures)}
    final = ctx.snapshot()
    final.update(stage=JobStage.DONE, done=table.num_rows, total=table.num_rows, eta_seconds=0)
    if not queue.finish(db, job.id, ctx.owner, JobState.SUCCEEDED, result=result, progress=final):
        ctx.lease_lost = True
        ctx.check()
    return result


def _embed(
    files: ScoringFiles, store: EmbeddingStore, encoder_name: str, total: int | None, ctx: JobContext, settings: Settings
) -> None:
    # The fit job's executor strategy, encoder loading and embedding driver (the same failures,
    # the same Ray path).
    from service.jobs.fit import embed_archive, image_executor

    executor = image_executor(encoder_name, settings)
    try:
        embed_archive(files.archive, executor, store, ctx, settings, total)
    finally:
        executor.close()


def release_inputs(settings: Settings, db: sessionmaker, job_id: str) -> None:
    """Remove a scoring job's archive and embeddings once the job is final (any final state);
    nothing for other kinds, or while the job is active (a worker that lost its lease must leave
    them to the one that took over)."""
    with db() as session:
        job = session.get(Job, job_id)
        if job is None or job.kind != JobKind.SCORE or job.state not in FINAL_JOB_STATES:
            return
        files = scoring_files(settings, job)
    try:
        files.remove_inputs()
    except OSError:  # a folder removed with its dataset meanwhile
        log.warning("could not remove the inputs of scoring job %s", job_id, exc_info=True)
