"""Nearest neighbors in feature space through faiss (GPU index where CUDA is present).

Cosine similarity: features are L2-normalised and searched with an inner-product index. The kNN
label agreement of a fit searches every sample's neighbours: exactly (flat index, O(N^2 D)) up
to ``exact_max_items`` samples, through inverted files above (k-means lists, a few probed per
query: about O(N^1.5 D); on a CPU joined list by list, :mod:`service.pipeline.list_join`), whose
recall against exact search is measured in docs/performance.md. The per-sample neighbor lists
of the API use an exact index kept per fit (:class:`IndexCache`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.domain import KnnSearch
from service.errors import TooLarge
from service.pipeline.list_join import list_top_k
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


# The inverted-file index above the exact limit: 4 sqrt(N) k-means lists trained on at most 32
# points each (10 iterations), 8 lists probed per query. Chosen on synthetic clustered 100k x 512
# features (recall@10 0.9996 against exact search; 4 lists: 0.995, 16: 1.0 at 1.2x the time).
IVF_LISTS_PER_SQRT_N = 4
IVF_TRAIN_POINTS_PER_LIST = 32
IVF_TRAIN_ITERATIONS = 10
IVF_PROBES = 8


def knn_search(n: int, exact_max_items: int) -> KnnSearch:
    """How :func:`knn_agreement` searches ``n`` samples: exact up to ``exact_max_items``."""
    return KnnSearch.EXACT if n <= exact_max_items else KnnSearch.APPROXIMATE


def _trained_ivf(x: np.ndarray):  # type: ignore[no-untyped-def]
    """An empty inverted-file inner-product index whose lists are trained on ``x`` (faiss
    subsamples the training rows with its fixed seed: the same lists on every run)."""
    faiss = _faiss()
    n, dim = x.shape
    lists = int(max(1, min(IVF_LISTS_PER_SQRT_N * np.sqrt(n), n // 8)))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, lists, faiss.METRIC_INNER_PRODUCT)
    index.cp.niter = IVF_TRAIN_ITERATIONS
    index.cp.max_points_per_centroid = IVF_TRAIN_POINTS_PER_LIST
    index.cp.min_points_per_centroid = 1  # no warning: few points per list is the intent
    index.train(x)
    index.nprobe = min(IVF_PROBES, lists)
    return index


def build_ivf_index(features: np.ndarray):  # type: ignore[no-untyped-def]
    """An inverted-file inner-product index over (normalised) float32 rows, trained on them."""
    x = np.ascontiguousarray(features, dtype=np.float32)
    index = _trained_ivf(x)
    index.add(x)
    if _gpu_count() > 0:
        index = _faiss().index_cpu_to_all_gpus(index)
    return index


def ivf_self_neighbors(
    features: np.ndarray, k: int, progress: Callable[[int], None] | None = None
) -> np.ndarray:
    """(N, k) rows of each row's k most similar rows (itself normally first; -1 where its probed
    lists hold fewer), as the inverted-file index of :func:`build_ivf_index` finds them. On a
    CPU every list meets all its queries in one product (:mod:`service.pipeline.list_join`, the
    same candidates and answer; 2.1x faster at 200k x 512, 2.25x at 1M); a GPU index searches
    them in batches."""
    x = np.ascontiguousarray(features, dtype=np.float32)
    if _gpu_count() > 0:
        return search_every_row(build_ivf_index(x), x, k, progress)
    index = _trained_ivf(x)
    _, probes = index.quantizer.search(x, index.nprobe)
    return list_top_k(x, probes, k, progress)[1]


def knn_agreement(
    unit_features: np.ndarray,
    labels: np.ndarray,
    k: int,
    exact_max_items: int | None = None,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Per sample: the share of its k nearest other samples (cosine; rows must be L2-normalised,
    as ``fit_dataset.labelled_features`` gives them) that carry the same label. Exact search up to
    ``exact_max_items`` samples (None: always), the inverted-file index above; ``progress`` gets
    the number of samples searched so far."""
    n = unit_features.shape[0]
    if n < 2:
        return np.full(n, np.nan)
    k = min(k, n - 1)
    x = np.ascontiguousarray(unit_features, dtype=np.float32)
    approximate = exact_max_items is not None and knn_search(n, exact_max_items) is KnnSearch.APPROXIMATE
    if approximate:
        neighbors = ivf_self_neighbors(x, k + 1, progress)
    else:
        neighbors = search_every_row(build_index(x), x, k + 1, progress)
    if progress:
        progress(n)
    _, label_codes = np.unique(labels, return_inverse=True)
    rows = np.arange(n)
    # Drop the sample itself (normally the first hit; duplicates may reorder ties), and the
    # empty slots (-1) an inverted-file search leaves when its probed lists hold too few rows.
    found = neighbors >= 0
    keep = found & (neighbors != rows[:, None])
    too_many = keep.sum(axis=1) > k  # self not found: drop the farthest found instead
    keep[np.flatnonzero(too_many), found.sum(axis=1)[too_many] - 1] = False
    same = (label_codes[np.where(keep, neighbors, 0)] == label_codes[:, None]) & keep
    with np.errstate(invalid="ignore"):
        return same.sum(axis=1) / keep.sum(axis=1)


def search_every_row(index, x: np.ndarray, k: int, progress: Callable[[int], None] | None = None) -> np.ndarray:  # type: ignore[no-untyped-def]
    """(N, k) rows of each row's k most similar rows by ``index``, searched in batches."""
    parts = []
    for start in range(0, x.shape[0], SEARCH_BATCH):
        parts.append(index.search(x[start : start + SEARCH_BATCH], k)[1])
        if progress:
            progress(min(start + SEARCH_BATCH, x.shape[0]))
    return np.concatenate(parts)


# Bytes an index holds per row besides its feature copies: the ``row_of`` entry (key string,
# boxed int, hash slot), measured at about 100-150 bytes for short IDs in CPython.
ROW_OVERHEAD_BYTES = 128


class NeighborIndexTooLarge(TooLarge):
    """One fit's neighbour index would not fit the cache's byte budget (413 naming the setting)."""

    def __init__(self, need: int, limit: int) -> None:
        super().__init__(
            f"the neighbour index of this fit needs more than {limit} bytes of memory (at least {need}); "
            "the limit is DIFFICULTY_NEIGHBOR_INDEX_MAX_BYTES: ask the operator to raise it"
        )
        self.need, self.limit = need, limit


def _index_bytes(features: np.ndarray, sample_ids: np.ndarray, labels: np.ndarray) -> int:
    # The features twice: our normalised copy and the flat faiss index's own.
    return 2 * features.nbytes + sample_ids.nbytes + labels.nbytes + ROW_OVERHEAD_BYTES * len(sample_ids)


@dataclass
class NeighborIndex:
    index: object
    sample_ids: np.ndarray
    labels: np.ndarray
    features: np.ndarray  # normalised float32, row-aligned with sample_ids
    row_of: dict[str, int]

    @property
    def nbytes(self) -> int:
        """What this index holds in memory (what the cache's byte budget counts)."""
        return _index_bytes(self.features, self.sample_ids, self.labels)

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


def load_neighbor_index(store: EmbeddingStore, num_chunks: int, max_bytes: int | None = None) -> NeighborIndex:
    """Index over the first ``num_chunks`` chunks of the store (the fit's snapshot).

    With ``max_bytes``, refused (:class:`NeighborIndexTooLarge`) as soon as the chunks read so
    far need more: chunk by chunk, so a refused index costs at most the budget plus one chunk,
    never the whole matrix."""
    ids, labels, feats = [], [], []
    need = 0
    for chunk_index in store.chunk_indices()[:num_chunks]:
        chunk = store.read_chunk(chunk_index)
        unit = np.asarray(normalize_features(chunk.features), dtype=np.float32)
        need += _index_bytes(unit, chunk.sample_ids, chunk.labels)
        if max_bytes is not None and need > max_bytes:
            raise NeighborIndexTooLarge(need, max_bytes)
        ids.append(chunk.sample_ids)
        labels.append(chunk.labels)
        feats.append(unit)
    if not feats:
        raise ValueError("the dataset has no embedded samples")
    sample_ids, all_labels, features = np.concatenate(ids), np.concatenate(labels), np.concatenate(feats)
    del ids, labels, feats
    return NeighborIndex(
        build_index(features),
        sample_ids,
        all_labels,
        features,
        {str(s): i for i, s in enumerate(sample_ids.tolist())},
    )


# Builds one fit's index: (store folder, chunks of the fit, byte budget) -> index.
IndexBuilder = Callable[[Path, int, int], NeighborIndex]


def _build_from_store(store_dir: Path, num_chunks: int, max_bytes: int) -> NeighborIndex:
    return load_neighbor_index(EmbeddingStore(store_dir), num_chunks, max_bytes=max_bytes)


class _Build:
    """One index being built: later requests for the same key wait for it instead of building."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: NeighborIndex | None = None
        self.error: BaseException | None = None

    def wait(self) -> NeighborIndex:
        self.done.wait()
        if self.error is not None:
            raise self.error
        assert self.result is not None
        return self.result


class IndexCache:
    """Neighbour indexes kept in memory per fit, within a total byte budget (least recently
    used evicted first).

    The lock guards only the bookkeeping, never a build: requests for different fits build in
    parallel; concurrent requests for one fit share a single build (and its error). An index
    larger than the whole budget is refused, never cached. Indexes being built are not counted
    until they are done (as many as requests in flight, each refused past the budget)."""

    def __init__(self, max_bytes: int, builder: IndexBuilder = _build_from_store) -> None:
        self.max_bytes = max_bytes
        self._builder = builder
        self._items: OrderedDict[str, NeighborIndex] = OrderedDict()
        self._building: dict[str, _Build] = {}
        self._lock = threading.Lock()

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(item.nbytes for item in self._items.values())

    def keys(self) -> list[str]:
        """Cached keys, least recently used first."""
        with self._lock:
            return list(self._items)

    def get(self, key: str, store_dir: Path, num_chunks: int) -> NeighborIndex:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            build = self._building.get(key)
            owner = build is None
            if build is None:
                build = self._building[key] = _Build()
        if not owner:
            return build.wait()
        try:
            built = self._builder(store_dir, num_chunks, self.max_bytes)
            if built.nbytes > self.max_bytes:
                raise NeighborIndexTooLarge(built.nbytes, self.max_bytes)
        except BaseException as exc:
            build.error = exc
            with self._lock:
                del self._building[key]
            build.done.set()
            raise
        with self._lock:
            self._items[key] = built
            del self._building[key]
            total = sum(item.nbytes for item in self._items.values())
            while total > self.max_bytes:
                _, evicted = self._items.popitem(last=False)  # never the new one: it fits alone
                total -= evicted.nbytes
        build.result = built
        build.done.set()
        return built
