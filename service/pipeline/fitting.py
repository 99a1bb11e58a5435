"""Fit and score a dataset whose features sit in an :class:`EmbeddingStore`.

Statistics are accumulated chunk by chunk and cached per prefix of chunks, so fitting again
after new items were added only reads the new chunks for the statistics. Scoring is one more
pass over the stored features; memory stays O(chunk x D + K x D + D^2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from service.statistics import (
    GaussianModel,
    Shrinkage,
    SufficientStatistics,
    fit_gaussians,
    normalize_features,
)
from service.storage.embeddings import EmbeddingStore

Progress = Callable[[int, int], None]  # (done, total) samples

SCORE_COLUMNS = ("sample_id", "label", "rmd", "md_class", "md_agnostic", "rmd_min", "predicted_label")


def _cache_tag(normalize: bool) -> str:
    return "normalized" if normalize else "raw"


@dataclass(frozen=True)
class FitResult:
    model: GaussianModel
    scores: pa.Table


def add_labelled(
    stats: SufficientStatistics | None,
    features: np.ndarray,
    labels: np.ndarray,
    sample_ids: np.ndarray,
    *,
    normalize: bool,
) -> SufficientStatistics | None:
    """Add a chunk's labelled rows (label != "") to ``stats`` (created on first use).

    The one place features become statistics: the embedding pipeline's streamed statistics and
    the ones recomputed here from the store must agree to the last digit (float64, then
    normalised)."""
    keep = np.asarray(labels) != ""
    if not keep.any():
        return stats
    x = np.asarray(features)[keep].astype(np.float64)
    if normalize:
        x = normalize_features(x)
    if stats is None:
        stats = SufficientStatistics(dim=x.shape[1], normalized=normalize)
    return stats.update(x, np.asarray(labels)[keep].tolist(), np.asarray(sample_ids)[keep].tolist())


def labelled_statistics(
    store: EmbeddingStore, *, normalize: bool, progress: Progress | None = None
) -> SufficientStatistics:
    """Statistics of the labelled samples in the store, reusing the cached prefix."""
    indices = store.chunk_indices()
    tag = _cache_tag(normalize)
    cached = store.cached_statistics(tag, len(indices))
    stats: SufficientStatistics | None = None
    start = 0
    if cached is not None:
        start, arrays = cached
        stats = SufficientStatistics.from_arrays(arrays)
        stats.normalized = normalize  # the cache's tag says so (older caches lack the field)
    total = len(indices)
    for done, index in enumerate(indices[start:], start=1):
        chunk = store.read_chunk(index)
        stats = add_labelled(stats, chunk.features, chunk.labels, chunk.sample_ids, normalize=normalize)
        if progress:
            progress(done, total - start)
    if stats is None:
        raise ValueError("the dataset has no labelled samples yet")
    if indices and (cached is None or cached[0] != len(indices)):
        store.write_statistics(tag, len(indices), stats.to_arrays())
    return stats


def extend_statistics_cache(
    store: EmbeddingStore, first_chunk: int, end_chunk: int, stats: SufficientStatistics | None
) -> bool:
    """Record the statistics of chunks ``first_chunk..end_chunk-1`` (normalised features, as
    streamed by the embedding pipeline) in the prefix cache, so that the next fit reads no
    features for them. Only extends a cache that covers exactly the chunks before
    ``first_chunk``; otherwise leaves the cache alone (the fit then reads those chunks)."""
    if end_chunk <= first_chunk:
        return False
    tag = _cache_tag(True)
    base: SufficientStatistics | None = None
    if first_chunk > 0:
        cached = store.cached_statistics(tag, first_chunk)
        if cached is None or cached[0] != first_chunk:
            return False
        base = SufficientStatistics.from_arrays(cached[1])
        base.normalized = True
    if stats is None and base is None:
        return False  # nothing labelled yet: the fit computes (and caches) from the features
    merged = stats if base is None else (base if stats is None else base.merge(stats))
    store.write_statistics(tag, end_chunk, merged.to_arrays())
    return True


def score_store(
    model: GaussianModel, store: EmbeddingStore, progress: Progress | None = None
) -> pa.Table:
    """Scores of every labelled sample in the store, as an Arrow table (SCORE_COLUMNS)."""
    parts: list[pa.Table] = []
    total = model.count  # the labelled samples the model was fitted on: the ones scored here
    done = 0
    for chunk in store.iter_chunks():
        keep = chunk.labels != ""
        if not keep.any():
            continue
        labels = chunk.labels[keep]
        s = model.score(chunk.features[keep], labels.tolist())
        parts.append(
            pa.table(
                {
                    "sample_id": pa.array(chunk.sample_ids[keep].tolist(), pa.string()),
                    "label": pa.array(labels.tolist(), pa.string()),
                    "rmd": s["rmd"],
                    "md_class": s["md_class"],
                    "md_agnostic": s["md_agnostic"],
                    "rmd_min": s["rmd_min"],
                    "predicted_label": pa.array(s["predicted_label"].tolist(), pa.string()),
                }
            )
        )
        done += int(keep.sum())
        if progress:
            progress(done, total)
    if not parts:
        raise ValueError("the dataset has no labelled samples to score")
    return pa.concat_tables(parts)


def fit_store(
    store: EmbeddingStore,
    *,
    normalize: bool = True,
    shrinkage: Shrinkage = "auto",
    progress: Progress | None = None,
) -> FitResult:
    """Gaussians and the score columns of SCORE_COLUMNS (the statistics core alone; the fit use
    case, :func:`service.pipeline.fit_dataset.fit_and_score`, adds the neighbor column)."""
    stats = labelled_statistics(store, normalize=normalize)
    model = fit_gaussians(stats, shrinkage)
    return FitResult(model, score_store(model, store, progress))
