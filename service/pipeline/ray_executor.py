"""The embedding pipeline on a Ray cluster, as Ray Data.

    samples -> chunks (driver) -> from_items -> map_batches(EmbedChunks actor pool) -> store

:class:`RayExecutor` is a strategy of the one embedding driver
(:func:`service.pipeline.embedding.embed_source`): one Ray Data row is one chunk of that driver,
the unit of work is :func:`service.pipeline.embedding.embed_chunk`, unchanged, and the driver
writes each returned chunk into the :class:`EmbeddingStore` as for the local executor. So a job
can switch executors, or resume a run of the other executor, and gets the same store.

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
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.ingest.sample import Sample
from service.pipeline.embedding import ChunkResult, Tick
from service.statistics import SufficientStatistics
from service.storage.thumbnails import pack, unpack

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
        from service.pipeline.embedding import DecodePool

        self.encoder = load_encoder(encoder_name, device=device)
        self.batch_size = batch_size
        # One decode pool for the actor's life, not one started and joined per chunk.
        self.decode = DecodePool.start(num_workers)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list[Any]]:
        from service.pipeline.embedding import embed_chunk

        out: dict[str, list[Any]] = {k: [] for k in ("index", "sample_ids", "labels", "features", "failures", "statistics", "encoder", "thumbnails")}
        for row in range(len(batch["index"])):
            samples = list(_samples_of(batch, row))
            result = embed_chunk(samples, self.encoder, batch_size=self.batch_size, decode=self.decode)
            out["index"].append(int(batch["index"][row]))
            out["sample_ids"].append(json.dumps(result.sample_ids))
            out["labels"].append(json.dumps(result.labels))
            out["features"].append(_npy_bytes(result.features))
            out["failures"].append(json.dumps(result.failures))
            out["statistics"].append(b"" if result.statistics is None else _npz_bytes(result.statistics.to_arrays()))
            out["encoder"].append(json.dumps(self.encoder.describe()))
            data, offsets = pack(result.thumbnails or [])
            out["thumbnails"].append(_npz_bytes({"data": data, "offsets": offsets}))
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


class RayExecutor:
    """Chunks embedded by an actor pool on a Ray cluster, sent in windows of bounded bytes."""

    encoder_record = None  # the actors load the encoder: each result carries its record

    def __init__(
        self,
        encoder_name: str,
        *,
        batch_size: int = 64,
        num_workers: int | None = None,
        device: str = "auto",
        settings: RaySettings | None = None,
    ) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.encoder_name = encoder_name
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.device = device
        self.settings = settings or RaySettings()
        self.ray = connect(self.settings)
        cluster_gpus = int(self.ray.cluster_resources().get("GPU", 0))
        gpus = self.settings.gpus_per_actor
        self.gpus = gpus if gpus is not None else float(cluster_gpus >= 1)
        # One actor per GPU; a single CPU actor on a cluster without GPUs.
        self.actors = self.settings.num_actors or (max(1, cluster_gpus) if self.gpus else 1)
        context = self.ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # chunks reach the store in source order
        context.enable_progress_bars = False

    def embed_chunks(
        self, chunks: Iterable[list[Sample]], *, tick: Tick, should_stop: Callable[[], bool] | None
    ) -> Iterator[ChunkResult]:
        window: list[dict[str, Any]] = []
        window_bytes = 0
        for chunk in chunks:
            row = _row(chunk)
            row["index"] = len(window)
            window.append(row)
            window_bytes += sum(len(p) for p in row["payloads"])
            if window_bytes >= WINDOW_BYTES:
                yield from self._run_window(window, tick)
                if should_stop is not None and should_stop():
                    return
                window, window_bytes = [], 0
        if window:
            yield from self._run_window(window, tick)

    def _run_window(self, window: list[dict[str, Any]], tick: Tick) -> Iterator[ChunkResult]:
        """Embed one window of chunks on the cluster, results in window order."""
        dataset = self.ray.data.from_items(window, override_num_blocks=len(window))
        embedded = dataset.map_batches(
            EmbedChunks,
            fn_constructor_kwargs={
                "encoder_name": self.encoder_name,
                "device": self.device,
                "batch_size": self.batch_size,
                "num_workers": self.num_workers,
                "cpus": self.settings.cpus_per_actor,
            },
            batch_size=1,
            batch_format="numpy",
            concurrency=self.actors,
            num_gpus=self.gpus,
            num_cpus=self.settings.cpus_per_actor,
            # Ray Data's actor pool restarts dead actors and retries their tasks without limit by
            # default (max_restarts=-1, max_task_retries=-1); tests/test_ray_executor.py checks it.
        )
        for result in embedded.iter_rows():
            ids = json.loads(result["sample_ids"])
            failures = [(str(a), str(b)) for a, b in json.loads(result["failures"])]
            statistics = (
                SufficientStatistics.from_arrays(_load_npz_bytes(result["statistics"]))
                if result["statistics"]
                else None
            )
            tick(len(ids) + len(failures))
            yield ChunkResult(
                sample_ids=ids,
                labels=json.loads(result["labels"]),
                features=np.load(io.BytesIO(result["features"]), allow_pickle=False),
                failures=failures,
                statistics=statistics,
                encoder=json.loads(result["encoder"]),
                thumbnails=list(unpack(**_load_npz_bytes(result["thumbnails"]))),
            )

    def close(self) -> None:
        pass  # the cluster outlives a run (a private local one ends with the process)
