"""The kNN label-agreement column against a brute-force float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

from service.domain import KnnSearch
from service.pipeline.fit_dataset import knn_column
from service.pipeline.neighbors import knn_agreement, knn_search
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


def clustered(n: int, d: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 8, n)
    x = rng.normal(size=(8, d))[y] * 3 + rng.normal(size=(n, d))
    return normalize_features(x).astype(np.float32), np.asarray([f"c{v}" for v in y])


def test_inverted_file_search_above_the_exact_limit_is_close_to_exact():
    x, labels = clustered(3000, 16, seed=5)
    want = brute_force(x, labels, 10)
    done = []
    got = knn_agreement(x, labels, 10, exact_max_items=1000, progress=done.append)
    assert knn_search(3000, 1000) is KnnSearch.APPROXIMATE and knn_search(1000, 1000) is KnnSearch.EXACT
    assert done[-1] == 3000
    # Approximate: most rows agree exactly with the exhaustive answer, and none is far off.
    assert np.mean(np.abs(got - want) < 1e-12) > 0.95
    assert np.abs(got - want).max() <= 0.3


def test_inverted_file_search_probing_every_list_is_exact():
    # 60 rows: at most 60 // 8 = 7 lists, all probed (IVF_PROBES = 8): an exhaustive search.
    x, labels = clustered(60, 6, seed=6)
    got = knn_agreement(x, labels, 5, exact_max_items=10)
    np.testing.assert_allclose(got, brute_force(x, labels, 5), atol=1e-12)


def test_fit_above_the_exact_limit_fills_the_column_approximately(tmp_path):
    from service.pipeline.fit_dataset import FitSettings, fit_and_score

    x, labels = clustered(600, 8, seed=7)
    store = EmbeddingStore(tmp_path / "store")
    store.write_chunk(0, [f"s{i}" for i in range(600)], labels.tolist(), x)
    exact = fit_and_score(store, FitSettings(shrinkage=0.01, knn_k=5))
    approximate = fit_and_score(store, FitSettings(shrinkage=0.01, knn_k=5, knn_max_items=100))
    assert exact.knn_search is KnnSearch.EXACT and approximate.knn_search is KnnSearch.APPROXIMATE
    a = approximate.scores.column("knn_agreement").to_numpy()
    b = exact.scores.column("knn_agreement").to_numpy()
    assert not np.isnan(a).any() and np.mean(np.abs(a - b) < 1e-12) > 0.95


class StopInside:
    """Stages that record progress per stage and raise at the n-th report of one stage."""

    def __init__(self, stage, at: int) -> None:
        self.stage, self.at, self.current, self.reports = stage, at, None, {}

    def set_stage(self, stage, total) -> None:
        self.current = stage

    def progress(self, done, total=None) -> None:
        self.reports.setdefault(self.current, []).append(done)
        if self.current == self.stage and len(self.reports[self.current]) >= self.at:
            raise RuntimeError(f"stopped inside {self.stage}")

    def check(self) -> None:
        pass


@pytest.mark.parametrize("stage", ["neighbors", "label_issues", "map"])
def test_long_fit_stages_report_progress_inside_so_a_stop_is_seen(tmp_path, stage):
    from service.domain import JobStage
    from service.pipeline.fit_dataset import FitSettings, fit_and_score

    x, labels = clustered(9000, 8, seed=8)
    store = EmbeddingStore(tmp_path / "store")
    for c, start in enumerate(range(0, 9000, 3000)):
        store.write_chunk(c, [f"s{i}" for i in range(start, start + 3000)], labels[start : start + 3000].tolist(), x[start : start + 3000])
    with pytest.raises(RuntimeError, match="stopped inside"):
        fit_and_score(store, FitSettings(shrinkage=0.01), StopInside(JobStage(stage), at=2))
