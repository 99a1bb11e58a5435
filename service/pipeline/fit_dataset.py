"""The fit use case, shared by the fit job and ``difficulty score``: put pending items into the
embedding store, fit and score (the neighbor column included), publish the fit's files.

Callers report through a :class:`Stages` object: the job's turns stages into durable progress and
checks for cancellation; the CLI's draws progress bars. Nothing here knows of jobs or HTTP.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pyarrow as pa

from service.domain import JobStage, KnnSearch
from service.pipeline.fitting import labelled_statistics, score_store
from service.pipeline.map2d import pca_map
from service.statistics import (
    GaussianModel,
    Shrinkage,
    SufficientStatistics,
    assign_folds,
    fit_gaussians,
    normalize_features,
    parse_shrinkage,
)
from service.statistics.label_issues import SELECTION_SAMPLE_ROWS, find_label_issues, noise_rows
from service.statistics.selection import FoldGaussian, fold_gaussians, select_shrinkage_by_log_loss
from service.storage.embeddings import EmbeddingStore
from service.storage.fits import FitFiles
from service.storage.uploads import default_ids

KNN_COLUMN = "knn_agreement"
LABEL_ISSUE_COLUMNS = ("label_issue_probability", "suggested_label", "suggested_label_probability", "is_label_issue")
# The label-issue model chosen on development seeds before the reported run (docs/evidence.md).
LABEL_NOISE_KIND = "full"
LABEL_ISSUE_REFITS = 1


class Stages(Protocol):
    """Where a long run reports what it does (``total`` None: unknown)."""

    def set_stage(self, stage: JobStage, total: int | None) -> None: ...

    def progress(self, done: int, total: int | None = None) -> None: ...

    def check(self) -> None:
        """Raise to stop between steps (cancelled, lease lost); return to go on."""


class Quiet:
    """Stages that report nowhere."""

    def set_stage(self, stage: JobStage, total: int | None) -> None:
        pass

    def progress(self, done: int, total: int | None = None) -> None:
        pass

    def check(self) -> None:
        pass


@dataclass(frozen=True)
class FitSettings:
    normalize: bool = True
    shrinkage: Shrinkage = "auto"
    knn_k: int = 10
    # Exact kNN is O(N^2 D): above this many samples an inverted-file index (pipeline.neighbors).
    knn_max_items: int = 20_000

    def __post_init__(self) -> None:
        object.__setattr__(self, "shrinkage", parse_shrinkage(self.shrinkage))


@dataclass(frozen=True)
class FitOutcome:
    model: GaussianModel
    scores: pa.Table  # SCORE_COLUMNS + KNN_COLUMN
    knn_k: int | None  # the k of the kNN column (fewer where the dataset has fewer samples)
    num_chunks: int  # the store's chunks the fit covers (the neighbor index's snapshot)
    map_xy: np.ndarray | None = None  # (N, 2) PCA map row-aligned with scores (pipeline.map2d)
    issue_log_odds: np.ndarray | None = None  # (N,) the label-issue ranking key, row-aligned
    knn_search: KnnSearch | None = None  # exact or approximate neighbours behind the kNN column


def copy_embeddings(
    store: EmbeddingStore,
    features: np.ndarray,
    labels: np.ndarray,
    ids: np.ndarray | None,
    *,
    first_chunk: int,
    chunk_rows: int,
    progress: Callable[[int], None] | None = None,
    on_chunk: Callable[[], None] | None = None,
) -> int:
    """Copy an N x D matrix into the store as chunks ``first_chunk, first_chunk + 1, ...`` of
    ``chunk_rows`` rows; chunks already present are kept (resume). ``ids`` None: the row index.
    Returns N."""
    n = features.shape[0]
    present = set(store.chunk_indices())
    for k, start in enumerate(range(0, n, chunk_rows)):
        stop = min(start + chunk_rows, n)
        if first_chunk + k not in present:
            chunk_ids = ids[start:stop] if ids is not None else default_ids(start, stop)
            store.write_chunk(first_chunk + k, chunk_ids.tolist(), labels[start:stop].tolist(), np.asarray(features[start:stop]))
            if on_chunk:
                on_chunk()
        if progress:
            progress(stop)
    return n


def fit_and_score(store: EmbeddingStore, settings: FitSettings, stages: Stages | None = None) -> FitOutcome:
    """Fit the Gaussians on the labelled samples of ``store`` and score every one of them, with
    the kNN label agreement column. Raises ``FitError`` (or ``ValueError``) for unfit data."""
    stages = stages or Quiet()
    num_chunks = len(store.chunk_indices())
    stages.set_stage(JobStage.FITTING, num_chunks)
    stats = labelled_statistics(store, normalize=settings.normalize, progress=stages.progress)
    stages.check()
    # The folds' tied-covariance eigendecompositions serve the shrinkage cross-validation and
    # the label-issue model alike (five D x D eigh, computed once).
    try:
        fold_models: list[FoldGaussian] | None = fold_gaussians(stats)
    except ValueError:  # too few samples for folds: the steps below say so in their own terms
        fold_models = None
    model = fit_gaussians(stats, settings.shrinkage, fold_models)
    stages.check()
    stages.set_stage(JobStage.SCORING, model.count)
    scores = score_store(model, store, progress=stages.progress)
    stages.check()
    # The labelled features are read (and normalised) once, for the neighbor column and the
    # label-issue model alike.
    ids, labels, features = labelled_features(store, normalize=settings.normalize)
    stages.set_stage(JobStage.NEIGHBORS, scores.num_rows)
    from service.pipeline.neighbors import knn_agreement, knn_search

    unit = features if settings.normalize else normalize_features(features).astype(np.float32)
    agreement = knn_agreement(unit, labels, settings.knn_k, settings.knn_max_items, progress=stages.progress)
    del unit
    knn_k = min(settings.knn_k, max(scores.num_rows - 1, 0))
    scores = scores.append_column(KNN_COLUMN, pa.array(agreement, pa.float64(), from_pandas=True))
    stages.check()
    stages.set_stage(JobStage.LABEL_ISSUES, scores.num_rows)
    issues = label_issue_columns(stats, model, ids, labels, features, fold_models, stages.progress)
    del features
    for name, values in issues.columns.items():
        scores = scores.append_column(name, values)
    stages.progress(scores.num_rows)
    stages.check()
    stages.set_stage(JobStage.MAP, scores.num_rows)
    xy = pca_map(model, store, num_chunks, progress=stages.progress)
    search = knn_search(scores.num_rows, settings.knn_max_items)
    return FitOutcome(model, scores, knn_k, num_chunks, xy, issues.log_odds, search)


@dataclass(frozen=True)
class IssueColumns:
    columns: dict[str, pa.Array]  # LABEL_ISSUE_COLUMNS, row-aligned with score_store
    log_odds: np.ndarray  # (N,) ranking key of the label-issue report
    shrinkage: float  # the rho the label-issue model used


def label_issue_columns(
    stats: SufficientStatistics,
    model: GaussianModel,
    ids: np.ndarray,
    labels: np.ndarray,
    features: np.ndarray,
    fold_models: list[FoldGaussian] | None = None,
    progress: Callable[[int], None] | None = None,
) -> IssueColumns:
    """The label-issue fields of every labelled sample (docs/method.md, "Label issues"): the
    Gaussian classifier's out-of-fold posterior at the rho of lowest held-out classification
    log-loss, a label-transition model fitted by EM on the given labels, one soft-label refit,
    and the calibration map. ``ids, labels, features``: the labelled samples in the space of
    ``stats`` (:func:`labelled_features`), in memory once (N x D float32). ``fold_models``:
    ``fold_gaussians(stats)`` if already computed. ``progress`` is called between the model's
    steps (rho, posteriors, noise model, refit, fields) with a share of N: where a job sees a
    cancellation inside the stage."""
    folds = assign_folds(ids.tolist(), stats.n_folds)
    if fold_models is None:
        fold_models = fold_gaussians(stats)
    # The held-out log-loss curve over rho is an average: evenly spaced rows estimate it well.
    rows = noise_rows(features.shape[0], SELECTION_SAMPLE_ROWS)
    rho = select_shrinkage_by_log_loss(
        stats, features[rows], labels[rows].tolist(), folds[rows], fold_models=fold_models
    ).best
    # Steps: rho, then (posteriors, noise model) per round, then the fields (reported by the
    # caller): progress moves by a share of N after each.
    n, steps = features.shape[0], 2 + 2 * (LABEL_ISSUE_REFITS + 1)
    done = itertools.count(1)

    def step() -> None:
        if progress:
            progress(n * min(next(done), steps - 1) // steps)

    step()
    found = find_label_issues(
        stats, features, labels.tolist(), folds, rho, kind=LABEL_NOISE_KIND, refits=LABEL_ISSUE_REFITS,
        fold_models=fold_models, on_step=step,
    ).issues
    classes = np.asarray(model.classes)
    columns = {
        "label_issue_probability": pa.array(found.probability, pa.float64()),
        "suggested_label": pa.array(classes[found.suggested].tolist(), pa.string()),
        "suggested_label_probability": pa.array(found.suggested_probability, pa.float64()),
        "is_label_issue": pa.array(found.is_issue, pa.bool_()),
    }
    return IssueColumns(columns, np.asarray(found.log_odds, dtype=np.float64), float(rho))


def labelled_features(store: EmbeddingStore, *, normalize: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sample_ids, labels, float32 features) of the labelled rows, in store order; L2-normalised
    when ``normalize`` (the space the statistics were accumulated in)."""
    ids, labels, parts = [], [], []
    for chunk in store.iter_chunks():
        keep = chunk.labels != ""
        ids.append(chunk.sample_ids[keep])
        labels.append(chunk.labels[keep])
        x = chunk.features[keep]
        parts.append(np.asarray(normalize_features(x) if normalize else x, dtype=np.float32))
    if not parts:
        raise ValueError("the dataset has no labelled samples")
    return np.concatenate(ids), np.concatenate(labels), np.concatenate(parts)


def knn_column(store: EmbeddingStore, k: int) -> np.ndarray:
    """The share of each labelled sample's k nearest labelled neighbors with its label, in the
    store's row order (the order of :func:`score_store`)."""
    from service.pipeline.neighbors import knn_agreement

    _, labels, features = labelled_features(store, normalize=True)
    return knn_agreement(features, labels, k)


def publish(outcome: FitOutcome, files: FitFiles) -> None:
    """Write the fit's files (model, score tables, metadata); the caller records the fit."""
    files.write(outcome.model.to_arrays(), outcome.scores, num_chunks=outcome.num_chunks, issue_log_odds=outcome.issue_log_odds)
    if outcome.map_xy is not None:
        files.write_map(outcome.scores, outcome.map_xy)
