"""The embedding pipeline on a Ray cluster, as Ray Data.

    samples -> chunks (driver) -> from_items -> map_batches(EmbedChunks actor pool) -> store

One Ray Data row is one chunk of the local executor: the same grouping of samples into chunks,
the same unit of work (:func:`service.pipeline.embedding.embed_chunk`, unchanged), and the
driver writes each returned chunk into the :class:`EmbeddingStore` exactly as the local executor
does (failures file, then the chunk file). So a job can switch executors, or resume a run of the
other executor, and gets the same store.

Rows carry a sample's path where the source has one (folders, manifests: read on the worker, a
shared filesystem or object store is assumed, as in any Ray cluster) and the encoded bytes
otherwise (archives, WebDataset shards). Byte-carrying rows are sent in windows of bounded size
so the driver never holds a whole dataset.

Faults: actors restart and their tasks retry (Ray Data's actor-pool defaults); since a
chunk is written once, by the driver, when its result arrives in order, a retried chunk is never
stored twice and a lost one is never skipped.

Ray is an optional extra (``pip install '.[ray]'``); nothing imports this module unless the
executor setting is ``ray``.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.ingest.sample import Sample
from service.pipeline.embedding import (
    EmbedReport,
    SettledCounter,
    check_encoder_record,
    chunks_to_embed,
    store_chunk,
)
from service.pipeline.fitting import extend_statistics_cache
from service.statistics import SufficientStatistics
from service.storage.embeddings import EmbeddingStore

# Encoded bytes sent to the cluster per Ray Data pipeline (window). Path rows are tiny and are
# all sent in one window, so the actor pool (and its model load) lives for the whole run.
WINDOW_BYTES = 1 << 30


@dataclass(frozen=True)
class RaySettings:
    address: str | None = None  # None: RAY_ADDRESS, else a local cluster
    num_actors: int | None = None  # None: one per GPU in the cluster, else 1
    gpus_per_actor: float | None = None  # None: 1 where the cluster has GPUs, else 0
    cpus_per_actor: float = 1.0


class EmbedChunks:
    """Ray Data actor: holds one encoder, embeds one chunk (row) per call."""

    def __init__(self, encoder_name: str, device: str, batch_size: int, num_workers: int | None, cpus: float) -> None:
        import torch

        from service.encoders import load_encoder

        # Ray pins OMP_NUM_THREADS to the actor's whole CPUs (1 for fractional requests); use
        # what the actor reserved for the forward pass on CPU.
        torch.set_num_threads(max(1, int(round(cpus))))
        from concurrent.futures import ThreadPoolExecutor

        from service.pipeline.embedding import default_workers

        self.encoder = load_encoder(encoder_name, device=device)
        self.batch_size = batch_size
        # One decode pool for the actor's life, not one started and joined per chunk.
        self.pool = ThreadPoolExecutor(max_workers=num_workers or default_workers(), thread_name_prefix="decode")

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        from service.pipeline.embedding import embed_chunk

        out: dict[str, list[Any]] = {k: [] for k in ("index", "sample_ids", "labels", "features", "failures", "statistics", "encoder")}
        for row in range(len(batch["index"])):
            samples = list(_samples_of(batch, row))
            result = embed_chunk(samples, self.encoder, batch_size=self.batch_size, pool=self.pool)
            out["index"].append(int(batch["index"][row]))
            out["sample_ids"].append(json.dumps(result.sample_ids))
            out["labels"].append(json.dumps(result.labels))
            out["features"].append(_npy_bytes(result.features))
            out["failures"].append(json.dumps(result.failures))
            out["statistics"].append(b"" if result.statistics is None else _npz_bytes(result.statistics.to_arrays()))
            out["encoder"].append(json.dumps(self.encoder.describe()))
        return out


def _samples_of(batch: dict[str, np.ndarray], row: int) -> Iterator[Sample]:
    ids = json.loads(batch["sample_ids"][row])
    labels = json.loads(batch["labels"][row])
    paths = json.loads(batch["paths"][row])
    errors = json.loads(batch["errors"][row])
    payloads = batch["payloads"][row]
    for i, sample_id in enumerate(ids):
        data = bytes(payloads[i]) if paths[i] is None else None
        yield Sample(sample_id, labels[i], data=data, path=paths[i], error=errors[i])


def _npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _load_npz_bytes(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def connect(settings: RaySettings) -> Any:
    import ray

    if not ray.is_initialized():
        address = settings.address or os.environ.get("RAY_ADDRESS") or None
        local = {} if address else {"_node_ip_address": "127.0.0.1"}  # a private cluster: loopback only
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False, include_dashboard=False, **local)
    return ray


def _row(chunk: list[Sample]) -> dict[str, Any]:
    """One chunk as a Ray Data row. A reader's own problems (unsafe name, unreadable member)
    travel with the sample and become failures in the unit of work, as in the local executor."""
    return {
        "sample_ids": json.dumps([s.sample_id for s in chunk]),
        "labels": json.dumps([s.label for s in chunk]),
        "paths": json.dumps([s.path if s.data is None else None for s in chunk]),
        "payloads": [s.data if s.data is not None else b"" for s in chunk],
        "errors": json.dumps([s.error for s in chunk]),
    }


def embed_source_ray(
    samples: Iterable[Sample],
    encoder_name: str,
    store: EmbeddingStore,
    *,
    total: int | None = None,
    chunk_size: int = 1024,
    batch_size: int = 64,
    num_workers: int | None = None,
    device: str = "auto",
    settings: RaySettings | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> EmbedReport:
    """Same contract as :func:`service.pipeline.embedding.embed_source`, on Ray."""
    if chunk_size < 1 or batch_size < 1:
        raise ValueError("chunk_size and batch_size must be at least 1")
    settings = settings or RaySettings()
    ray = connect(settings)
    started = time.perf_counter()
    report = EmbedReport()
    tick = SettledCounter(progress, total)
    cluster_gpus = int(ray.cluster_resources().get("GPU", 0))
    gpus = settings.gpus_per_actor if settings.gpus_per_actor is not None else float(cluster_gpus >= 1)
    # One actor per GPU; a single CPU actor on a cluster without GPUs.
    actors = settings.num_actors or (max(1, cluster_gpus) if gpus else 1)
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # chunks reach the store in source order
    context.enable_progress_bars = False

    window: list[dict[str, Any]] = []
    early_failures: dict[int, list[tuple[str, str]]] = {}
    window_bytes = 0
    first_chunk = store.next_index()
    for chunk, early in chunks_to_embed(samples, store, chunk_size, report, tick):
        row = _row(chunk)
        row["index"] = len(window)
        early_failures[len(window)] = early
        window.append(row)
        window_bytes += sum(len(p) for p in row["payloads"])
        if window_bytes >= WINDOW_BYTES:
            if not _run_window(ray, window, early_failures, encoder_name, device, batch_size, num_workers, actors, gpus, settings, store, report, tick, should_stop):
                break
            window, early_failures, window_bytes = [], {}, 0
    else:
        if window:
            _run_window(ray, window, early_failures, encoder_name, device, batch_size, num_workers, actors, gpus, settings, store, report, tick, should_stop)
    extend_statistics_cache(store, first_chunk, first_chunk + report.chunks_written, report.statistics)
    report.seconds = time.perf_counter() - started
    return report


def _run_window(
    ray: Any,
    window: list[dict[str, Any]],
    early_failures: dict[int, list[tuple[str, str]]],
    encoder_name: str,
    device: str,
    batch_size: int,
    num_workers: int | None,
    actors: int,
    gpus: float,
    settings: RaySettings,
    store: EmbeddingStore,
    report: EmbedReport,
    tick: Callable[[int], None],
    should_stop: Callable[[], bool] | None,
) -> bool:
    """Embed one window of chunks on the cluster and store the results; False when stopped."""
    dataset = ray.data.from_items(window, override_num_blocks=len(window))
    embedded = dataset.map_batches(
        EmbedChunks,
        fn_constructor_kwargs={
            "encoder_name": encoder_name,
            "device": device,
            "batch_size": batch_size,
            "num_workers": num_workers,
            "cpus": settings.cpus_per_actor,
        },
        batch_size=1,
        batch_format="numpy",
        concurrency=actors,
        num_gpus=gpus,
        num_cpus=settings.cpus_per_actor,
        # Ray Data's actor pool restarts dead actors and retries their tasks without limit by
        # default (max_restarts=-1, max_task_retries=-1); tests/test_ray_executor.py checks it.
    )
    checked = False
    for result in embedded.iter_rows():
        if not checked:
            check_encoder_record(store, json.loads(result["encoder"]))
            checked = True
        index = int(result["index"])
        ids = json.loads(result["sample_ids"])
        labels = json.loads(result["labels"])
        features = np.load(io.BytesIO(result["features"]), allow_pickle=False)
        failures = [tuple(f) for f in early_failures[index]] + [tuple(f) for f in json.loads(result["failures"])]
        store_chunk(store, ids, labels, features, failures, report)  # type: ignore[arg-type]
        if result["statistics"]:
            stats = SufficientStatistics.from_arrays(_load_npz_bytes(result["statistics"]))
            report.statistics = stats if report.statistics is None else report.statistics.merge_in_place(stats)
        tick(len(ids) + len(json.loads(result["failures"])))
        if should_stop is not None and should_stop():
            report.stopped = True
            return False
    return True

