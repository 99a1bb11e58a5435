"""A 2-D map of a dataset for the dashboard: PCA of the fitted features.

The fit already holds what PCA needs: the class-agnostic mean ``mu_0`` and covariance
``Sigma_0`` of the (normalised, where the fit normalises) labelled features. The map is their
two leading eigenvectors and one projection pass over the store (O(chunk) memory, N x D x 2
flops: seconds at 1M samples), row-aligned with the score table the fit produces.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from scipy.linalg import eigh
from scipy.sparse.linalg import ArpackError, eigsh

from service.statistics import GaussianModel, normalize_features
from service.storage.embeddings import EmbeddingStore

LANCZOS_MIN_DIM = 64  # below, a dense eigendecomposition is cheaper than Lanczos iterations


def leading_eigenvectors(covariance: np.ndarray, k: int) -> np.ndarray:
    """(D, k) eigenvectors of the k largest eigenvalues, largest first. Lanczos (``eigsh``, a
    fixed start vector: deterministic) for large D: a few matrix-vector products instead of a
    dense O(D^3) decomposition (2 s of CPU at D = 1280 with ``eigh``)."""
    d = covariance.shape[0]
    values = vectors = None
    if d > LANCZOS_MIN_DIM:
        try:
            values, vectors = eigsh(covariance, k=k, which="LA", v0=np.ones(d))
        except (ArpackError, ValueError):  # a degenerate covariance (rank < k): no Krylov space
            values = None
    if values is None:
        values, vectors = eigh(covariance, subset_by_index=(d - k, d - 1))
    return vectors[:, np.argsort(values)[::-1]]


def principal_axes(model: GaussianModel, components: int = 2) -> np.ndarray:
    """(D, components) leading eigenvectors of the model's class-agnostic covariance, largest
    first, each signed so its largest coordinate is positive (the same map on every run)."""
    d = model.dim
    k = min(components, d)
    vectors = leading_eigenvectors(model.covariance_agnostic, k)
    signs = np.sign(vectors[np.abs(vectors).argmax(axis=0), np.arange(k)])
    vectors = vectors * np.where(signs == 0, 1.0, signs)
    if k < components:  # a 1-D feature space: a flat second axis
        vectors = np.hstack([vectors, np.zeros((d, components - k))])
    return vectors


def pca_map(
    model: GaussianModel,
    store: EmbeddingStore,
    num_chunks: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """(N, 2) float32 map coordinates of the labelled samples of the first ``num_chunks`` chunks,
    in store order (the row order of ``pipeline.fitting.score_store``); ``progress`` gets the
    samples mapped so far, after each chunk."""
    axes = principal_axes(model)
    parts = []
    done = 0
    for index in store.chunk_indices()[:num_chunks]:
        chunk = store.read_chunk(index)
        x = np.asarray(chunk.features[chunk.labels != ""], dtype=np.float64)
        if model.normalized:
            x = normalize_features(x)
        parts.append(((x - model.mean_agnostic) @ axes).astype(np.float32))
        done += x.shape[0]
        if progress:
            progress(done)
    return np.concatenate(parts) if parts else np.zeros((0, 2), np.float32)
