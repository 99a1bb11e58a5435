"""Nearest neighbors in feature space through faiss (GPU index where CUDA is present).

Cosine similarity: features are L2-normalised and searched with an inner-product index. Exact
(flat) search: kNN label agreement over a whole dataset is O(N^2 D), so the fit computes it only
up to a configured size (``knn_max_items``). The per-sample neighbor lists of the API use an
index kept per fit (:class:`IndexCache`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.statistics import normalize_features
from service.storage.embeddings import EmbeddingStore

SEARCH_BATCH = 4096


def _faiss():  # type: ignore[no-untyped-def]
    import faiss

    return faiss


def _gpu_count() -> int:
    faiss = _faiss()
    try:
        return int(faiss.get_num_gpus()) if hasattr(faiss, "get_num_gpus") else 0
    except Exception:  # a GPU build on a machine without a usable driver
        return 0


def build_index(features: np.ndarray):  # type: ignore[no-untyped-def]
    """An exact inner-product index over (already normalised) float32 rows."""
    faiss = _faiss()
    x = np.ascontiguousarray(features, dtype=np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    if _gpu_count() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(x)
    return index


def read_unit_features(
    store: EmbeddingStore, num_chunks: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sample_ids, labels, L2-normalised float32 features) of the first ``num_chunks`` chunks."""
    ids, labels, feats = [], [], []
    for index in store.chunk_indices()[:num_chunks]:
        chunk = store.read_chunk(index)
        ids.append(chunk.sample_ids)
        labels.append(chunk.labels)
        feats.append(np.asarray(normalize_features(chunk.features), dtype=np.float32))
    if not feats:
        raise ValueError("the dataset has no embedded samples")
    return np.concatenate(ids), np.concatenate(labels), np.concatenate(feats)


def knn_agreement(unit_features: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """Per sample: the share of its k nearest other samples (cosine; rows must be L2-normalised,
    as :func:`read_unit_features` gives them) that carry the same label."""
    n = unit_features.shape[0]
    if n < 2:
        return np.full(n, np.nan)
    k = min(k, n - 1)
    x = np.ascontiguousarray(unit_features, dtype=np.float32)
    index = build_index(x)
    _, label_codes = np.unique(labels, return_inverse=True)
    out = np.empty(n)
    for start in range(0, n, SEARCH_BATCH):
        stop = min(start + SEARCH_BATCH, n)
        _, neighbors = index.search(x[start:stop], k + 1)
        rows = np.arange(start, stop)
        # Drop the sample itself (normally the first hit; duplicates may reorder ties).
        is_self = neighbors == rows[:, None]
        keep = ~is_self
        keep[~is_self.any(axis=1), k] = False  # self not found: drop the farthest instead
        others = neighbors[keep].reshape(stop - start, k)
        out[start:stop] = (label_codes[others] == label_codes[rows, None]).mean(axis=1)
    return out


@dataclass
class NeighborIndex:
    index: object
    sample_ids: np.ndarray
    labels: np.ndarray
    features: np.ndarray  # normalised float32, row-aligned with sample_ids
    row_of: dict[str, int]

    def neighbors(self, sample_id: str, k: int) -> list[dict[str, object]]:
        row = self.row_of[sample_id]
        k = min(k, len(self.sample_ids) - 1)
        if k <= 0:
            return []
        similarity, rows = self.index.search(self.features[row : row + 1], k + 1)  # type: ignore[attr-defined]
        out = []
        for sim, r in zip(similarity[0], rows[0], strict=True):
            if r < 0 or r == row:
                continue
            out.append(
                {
                    "sample_id": str(self.sample_ids[r]),
                    "label": str(self.labels[r]) or None,
                    "similarity": float(sim),
                }
            )
        return out[:k]


def load_neighbor_index(store: EmbeddingStore, num_chunks: int) -> NeighborIndex:
    """Index over the first ``num_chunks`` chunks of the store (the fit's snapshot)."""
    sample_ids, labels, features = read_unit_features(store, num_chunks)
    return NeighborIndex(
        build_index(features),
        sample_ids,
        labels,
        features,
        {str(s): i for i, s in enumerate(sample_ids.tolist())},
    )


class IndexCache:
    """A few indexes kept in memory, keyed by fit (each costs about one copy of the matrix)."""

    def __init__(self, size: int = 2) -> None:
        self.size = size
        self._items: OrderedDict[str, NeighborIndex] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str, store_dir: Path, num_chunks: int) -> NeighborIndex:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            built = load_neighbor_index(EmbeddingStore(store_dir), num_chunks)
            self._items[key] = built
            while len(self._items) > self.size:
                self._items.popitem(last=False)
            return built
