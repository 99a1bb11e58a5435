"""The kNN label-agreement column against a brute-force float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

from service.pipeline.fit_dataset import knn_column
from service.pipeline.neighbors import knn_agreement
from service.statistics import normalize_features
from service.storage.embeddings import EmbeddingStore


def brute_force(features: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    x = normalize_features(features.astype(np.float64))
    out = np.empty(len(x))
    for i in range(len(x)):
        similarity = x @ x[i]
        similarity[i] = -np.inf  # never its own neighbor
        nearest = np.argsort(-similarity, kind="stable")[:k]
        out[i] = np.mean(labels[nearest] == labels[i])
    return out


@pytest.mark.parametrize("k", [1, 5, 10])
def test_agreement_matches_brute_force(k):
    rng = np.random.default_rng(k)
    features = rng.normal(size=(300, 12))
    labels = np.asarray([f"c{v}" for v in rng.integers(0, 4, size=300)])
    got = knn_agreement(normalize_features(features).astype(np.float32), labels, k)
    np.testing.assert_allclose(got, brute_force(features, labels, k), atol=1e-12)


def test_tiny_sets_and_unlabelled_rows(tmp_path):
    labels = np.asarray(["a", "b"])
    assert np.isnan(knn_agreement(np.ones((1, 3), np.float32), labels[:1], 10)).all()
    two = normalize_features(np.asarray([[1.0, 0.0], [0.0, 1.0]])).astype(np.float32)
    np.testing.assert_array_equal(knn_agreement(two, labels, 10), [0.0, 0.0])  # k capped at N - 1

    # The column of a store covers its labelled rows only, in store order.
    rng = np.random.default_rng(0)
    store = EmbeddingStore(tmp_path / "store")
    features = rng.normal(size=(40, 6)).astype(np.float32)
    chunk_labels = np.asarray(["x", "y", ""] * 13 + ["x"])
    store.write_chunk(0, [str(i) for i in range(20)], chunk_labels[:20].tolist(), features[:20])
    store.write_chunk(1, [str(i) for i in range(20, 40)], chunk_labels[20:].tolist(), features[20:])
    keep = chunk_labels != ""
    np.testing.assert_allclose(knn_column(store, 3), brute_force(features[keep], chunk_labels[keep], 3), atol=1e-12)
