"""The neighbour-index cache under concurrent and oversized requests (finding 11).

Builds are per key: a slow builder injected through the constructor shows that a build for one
fit does not hold the cache while another fit's index is built, and that concurrent requests for
one fit share a single build. The byte budget evicts the least recently used index and refuses
one larger than the whole budget, from the real store reader as well (refused after at most one
chunk past the budget) and through the API (413 naming the setting)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import blobs, make_settings, npy, wait_for_job
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.errors import TooLarge
from service.pipeline.neighbors import (
    IndexCache,
    NeighborIndex,
    NeighborIndexTooLarge,
    load_neighbor_index,
)
from service.storage.embeddings import EmbeddingStore

WAIT = 30.0  # seconds: only a bound for a broken implementation, never a measured time


def small_index(rows: int, dim: int = 4) -> NeighborIndex:
    ids = np.asarray([f"s{i}" for i in range(rows)], dtype=np.str_)
    return NeighborIndex(
        index=None,
        sample_ids=ids,
        labels=np.asarray(["a"] * rows, dtype=np.str_),
        features=np.zeros((rows, dim), dtype=np.float32),
        row_of={str(s): i for i, s in enumerate(ids.tolist())},
    )


class GatedBuilder:
    """Builds block until released; records which keys (store folders) started building."""

    def __init__(self, rows: int = 10) -> None:
        self.rows = rows
        self.started: list[str] = []
        self.started_event: dict[str, threading.Event] = {}
        self.release: dict[str, threading.Event] = {}
        self._lock = threading.Lock()

    def gate(self, name: str) -> None:
        self.started_event[name] = threading.Event()
        self.release[name] = threading.Event()

    def __call__(self, store_dir: Path, num_chunks: int, max_bytes: int) -> NeighborIndex:
        name = store_dir.name
        with self._lock:
            self.started.append(name)
        self.started_event[name].set()
        assert self.release[name].wait(WAIT), f"build of {name} never released"
        return small_index(self.rows)


def run(fn, results: dict, name: str) -> threading.Thread:  # type: ignore[no-untyped-def]
    def target() -> None:
        try:
            results[name] = fn()
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            results[name] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def test_different_fits_build_in_parallel() -> None:
    builder = GatedBuilder()
    builder.gate("a")
    builder.gate("b")
    cache = IndexCache(max_bytes=10**9, builder=builder)
    results: dict = {}
    first = run(lambda: cache.get("fit-a", Path("a"), 1), results, "a")
    assert builder.started_event["a"].wait(WAIT)
    # Fit a's build is still blocked: fit b's build must start anyway (a global lock held
    # across builds would block it here until a is released).
    second = run(lambda: cache.get("fit-b", Path("b"), 1), results, "b")
    assert builder.started_event["b"].wait(WAIT), "the second fit waited for the first fit's build"
    assert not builder.release["a"].is_set()
    builder.release["b"].set()
    second.join(WAIT)
    assert isinstance(results["b"], NeighborIndex) and "a" not in results
    builder.release["a"].set()
    first.join(WAIT)
    assert isinstance(results["a"], NeighborIndex)
    assert sorted(cache.keys()) == ["fit-a", "fit-b"]


def test_concurrent_requests_for_one_fit_build_once() -> None:
    builder = GatedBuilder()
    builder.gate("a")
    cache = IndexCache(max_bytes=10**9, builder=builder)
    results: dict = {}
    threads = [run(lambda: cache.get("fit-a", Path("a"), 1), results, f"r{i}") for i in range(8)]
    assert builder.started_event["a"].wait(WAIT)
    builder.release["a"].set()
    for thread in threads:
        thread.join(WAIT)
    assert builder.started == ["a"]
    built = {id(results[f"r{i}"]) for i in range(8)}
    assert len(built) == 1 and isinstance(results["r0"], NeighborIndex)
    cache.get("fit-a", Path("a"), 1)  # cached: no second build
    assert builder.started == ["a"]


def test_a_failed_build_is_shared_and_not_cached() -> None:
    calls: list[str] = []
    release = threading.Event()
    entered = threading.Event()

    def failing(store_dir: Path, num_chunks: int, max_bytes: int) -> NeighborIndex:
        calls.append(store_dir.name)
        entered.set()
        assert release.wait(WAIT)
        raise ValueError("the dataset has no embedded samples")

    cache = IndexCache(max_bytes=10**9, builder=failing)
    results: dict = {}
    threads = [run(lambda: cache.get("fit-a", Path("a"), 1), results, f"r{i}") for i in range(3)]
    assert entered.wait(WAIT)
    release.set()
    for thread in threads:
        thread.join(WAIT)
    assert all(isinstance(results[f"r{i}"], ValueError) for i in range(3))
    assert cache.keys() == []
    with pytest.raises(ValueError):
        cache.get("fit-a", Path("a"), 1)  # tried again, not a cached failure
    assert len(calls) >= 2


def test_byte_budget_evicts_least_recently_used() -> None:
    one = small_index(100).nbytes
    cache = IndexCache(max_bytes=2 * one + one // 2, builder=lambda d, n, m: small_index(100))
    cache.get("fit-a", Path("a"), 1)
    cache.get("fit-b", Path("b"), 1)
    cache.get("fit-a", Path("a"), 1)  # a is now the most recently used
    cache.get("fit-c", Path("c"), 1)
    assert cache.keys() == ["fit-a", "fit-c"]
    assert cache.nbytes <= cache.max_bytes


def test_an_index_larger_than_the_budget_is_refused_and_not_cached() -> None:
    big = small_index(1000)
    cache = IndexCache(max_bytes=big.nbytes - 1, builder=lambda d, n, m: small_index(1000))
    with pytest.raises(NeighborIndexTooLarge) as refused:
        cache.get("fit-big", Path("big"), 1)
    assert isinstance(refused.value, TooLarge)
    assert "DIFFICULTY_NEIGHBOR_INDEX_MAX_BYTES" in str(refused.value)
    assert cache.keys() == [] and cache.nbytes == 0


def _store(tmp_path: Path, chunks: int, rows: int = 50, dim: int = 16) -> EmbeddingStore:
    store = EmbeddingStore(tmp_path / "store")
    rng = np.random.default_rng(0)
    for c in range(chunks):
        ids = [f"c{c}-{i}" for i in range(rows)]
        store.write_chunk(c, ids, ["x"] * rows, rng.normal(size=(rows, dim)).astype(np.float32))
    return store


def test_the_store_reader_stops_at_the_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = _store(tmp_path, chunks=6)
    whole = load_neighbor_index(store, 6)
    assert whole.nbytes > 0 and len(whole.sample_ids) == 300
    read: list[int] = []
    original = store.read_chunk
    monkeypatch.setattr(store, "read_chunk", lambda i: read.append(i) or original(i))
    with pytest.raises(NeighborIndexTooLarge):
        load_neighbor_index(store, 6, max_bytes=whole.nbytes // 3 - 1)  # under two chunks
    # Refused after the chunk that crossed the budget: the rest of the matrix is never read.
    assert read == [0, 1]
    read.clear()
    assert len(load_neighbor_index(store, 6, max_bytes=whole.nbytes).sample_ids) == 300


def test_the_api_refuses_an_oversized_index_naming_the_setting(tmp_path: Path) -> None:
    features, labels = blobs(300)
    settings = make_settings(tmp_path / "data", neighbor_index_max_bytes=10_000)
    with TestClient(create_app(settings)) as c:
        dataset_id = c.post("/v1/datasets", json={"name": "n", "encoder": "my-features"}).json()["id"]
        files = {"embeddings": ("e.npy", npy(features)), "labels": ("l.txt", "\n".join(map(str, labels)))}
        assert c.post(f"/v1/datasets/{dataset_id}/embeddings", files=files).status_code == 201
        job = wait_for_job(c, c.post(f"/v1/datasets/{dataset_id}/fit").json()["job_id"])
        assert job["state"] == "succeeded", job
        refused = c.get(f"/v1/datasets/{dataset_id}/samples/0/neighbors")
        assert refused.status_code == 413, refused.text
        assert "DIFFICULTY_NEIGHBOR_INDEX_MAX_BYTES" in refused.json()["detail"]
        assert c.app.state.ctx.indexes.keys() == []
        # The rest of the dataset is still served.
        assert c.get(f"/v1/datasets/{dataset_id}/scores").status_code == 200
