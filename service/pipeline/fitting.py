"""Fit and score a dataset whose features sit in an :class:`EmbeddingStore`.

Statistics are accumulated chunk by chunk and cached per prefix of chunks, so fitting again
after new items were added only reads the new chunks for the statistics. Scoring is one more
pass over the stored features; memory stays O(chunk x D + K x D + D^2).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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
from service.storage.files import atomic_savez, load_npz

Progress = Callable[[int, int], None]  # (done, total) samples

SCORE_COLUMNS = ("sample_id", "label", "rmd", "md_class", "md_agnostic", "rmd_min", "predicted_label")


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
        stats = SufficientStatistics(dim=x.shape[1])
    return stats.update(x, np.asarray(labels)[keep].tolist(), np.asarray(sample_ids)[keep].tolist())


def labelled_statistics(
    store: EmbeddingStore, *, normalize: bool, progress: Progress | None = None
) -> SufficientStatistics:
    """Statistics of the labelled samples in the store, reusing the cached prefix."""
    indices = store.chunk_indices()
    tag = "normalized" if normalize else "raw"
    cached = _latest_cache(store, tag, len(indices))
    stats: SufficientStatistics | None = None
    start = 0
    if cached is not None:
        start, path = cached
        stats = SufficientStatistics.from_arrays(load_npz(path))
    total = len(indices)
    for done, index in enumerate(indices[start:], start=1):
        chunk = store.read_chunk(index)
        stats = add_labelled(stats, chunk.features, chunk.labels, chunk.sample_ids, normalize=normalize)
        if progress:
            progress(done, total - start)
    if stats is None:
        raise ValueError("the dataset has no labelled samples yet")
    if indices and (cached is None or cached[0] != len(indices)):
        _write_cache(store, tag, len(indices), stats)
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
    tag = "normalized"
    base: SufficientStatistics | None = None
    if first_chunk > 0:
        cached = _latest_cache(store, tag, first_chunk)
        if cached is None or cached[0] != first_chunk:
            return False
        base = SufficientStatistics.from_arrays(load_npz(cached[1]))
    if stats is None and base is None:
        return False  # nothing labelled yet: the fit computes (and caches) from the features
    merged = stats if base is None else (base if stats is None else base.merge(stats))
    _write_cache(store, tag, end_chunk, merged)
    return True


def _cache_files(store: EmbeddingStore, tag: str) -> list[tuple[int, Path]]:
    # A cache "upto-k" covers chunks 0..k-1; valid only while those chunks are unchanged,
    # which holds because chunks are append-only.
    if not store.directory.is_dir():
        return []
    pattern = re.compile(rf"^stats-{tag}-upto-(\d{{6}})\.npz$")
    return [(int(m.group(1)), p) for p in store.directory.iterdir() if (m := pattern.match(p.name))]


def _latest_cache(store: EmbeddingStore, tag: str, max_chunks: int) -> tuple[int, Path] | None:
    usable = [entry for entry in _cache_files(store, tag) if entry[0] <= max_chunks]
    return max(usable, default=None, key=lambda entry: entry[0])


def _write_cache(store: EmbeddingStore, tag: str, upto: int, stats: SufficientStatistics) -> None:
    """Write the cache for chunks 0..upto-1 and remove the shorter prefixes it supersedes (each
    is F x D x D float64: tens to hundreds of MB)."""
    atomic_savez(store.directory / f"stats-{tag}-upto-{upto:06d}.npz", stats.to_arrays())
    for covered, path in _cache_files(store, tag):
        if covered < upto:
            path.unlink(missing_ok=True)


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
    stats = labelled_statistics(store, normalize=normalize)
    model = fit_gaussians(stats, shrinkage, normalized=normalize)
    return FitResult(model, score_store(model, store, progress))
