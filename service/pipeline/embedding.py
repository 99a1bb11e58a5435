"""Images -> features in a chunk store: decode in parallel, embed in batches, write per chunk.

The unit of work is :func:`embed_chunk` (samples -> features + failures + statistics); it does no
I/O besides reading the samples, so a Ray actor can run it unchanged. Executors are strategies
that run it over a stream of chunks: :class:`LocalExecutor` in this process, ``RayExecutor``
(``pipeline.ray_executor``) on a cluster. :func:`embed_source` is the one driver: it skips what
the store already holds (resume), groups the rest into chunks, hands them to the executor, writes
each finished chunk atomically with the items it could not use, and reports progress.

Overlap: decode + preprocess run in a thread pool a few batches ahead of the forward pass (PIL's
decoders/resamplers and torch kernels release the GIL), so on a CPU the forward pass, not the
decode, sets the pace; on CUDA, batches are staged in pinned memory and JPEGs decode on the GPU.
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from PIL import ExifTags

from service.encoders.base import Encoder
from service.encoders.names import EncoderError
from service.ingest.sample import Sample
from service.pipeline.decode import BadImage, decode_image, open_image, read_sample_bytes
from service.pipeline.fitting import add_labelled, extend_statistics_cache
from service.pipeline.gpu_decode import decode_batch_on_gpu, gpu_decode_supported
from service.statistics import SufficientStatistics
from service.storage.embeddings import EmbeddingStore
from service.storage.thumbnails import THUMBNAIL_SIZE, ThumbnailStore, make_thumbnail

Tick = Callable[[int], None]  # told how many samples were settled (embedded, failed or present)


@dataclass
class ChunkResult:
    sample_ids: list[str]
    labels: list[str]  # "" = unlabelled
    features: np.ndarray  # (n, D) float32, unnormalised
    failures: list[tuple[str, str]]  # (sample_id, reason)
    # Statistics of the L2-normalised labelled features (the default fit), mergeable across
    # chunks and workers with SufficientStatistics.merge. None when nothing was labelled.
    statistics: SufficientStatistics | None = None
    stopped: bool = False  # should_stop() fired: this result is partial and must not be stored
    encoder: dict | None = None  # the encoder's describe() record, where the executor reports it
    # A small JPEG per embedded sample (row-aligned with sample_ids; None where none was made),
    # made from the decoded image so the archive is never read twice.
    thumbnails: list[bytes | None] | None = None


@dataclass
class EmbedReport:
    embedded: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    skipped_existing: int = 0
    stopped: bool = False
    chunks_written: int = 0
    seconds: float = 0.0
    statistics: SufficientStatistics | None = None  # of the chunks written in this run

    @property
    def per_second(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0


# -- decode workers ---------------------------------------------------------------------------

_GPU_JPEG = "gpu-jpeg"


def _prepare(sample: Sample, encoder: Encoder, gpu_jpeg: bool) -> tuple[str, object]:
    """In a worker thread: ("ok", tensor) | (_GPU_JPEG, bytes) | ("bad", reason)."""
    kind, payload, _ = _prepare_with_thumbnail(sample, encoder, gpu_jpeg)
    return kind, payload


def _prepare_with_thumbnail(sample: Sample, encoder: Encoder, gpu_jpeg: bool) -> tuple[str, object, bytes | None]:
    """:func:`_prepare` plus the sample's thumbnail, made from the image decoded for the encoder."""
    try:
        data = read_sample_bytes(sample)
        if gpu_jpeg:
            image = open_image(data)  # header checks only; the GPU decodes the pixels
            # nvJPEG ignores EXIF orientation: rotated photos take the CPU path, which applies it.
            upright = image.getexif().get(ExifTags.Base.Orientation, 1) == 1
            if image.format == "JPEG" and image.mode in ("RGB", "L") and upright:
                # The thumbnail from a 1/8-scale DCT decode: a fraction of a full decode.
                return _GPU_JPEG, data, _thumbnail(decode_image(data, draft_size=THUMBNAIL_SIZE))
        image = decode_image(data, draft_size=encoder.decode_size)
        return "ok", encoder.preprocess(image), _thumbnail(image)
    except BadImage as exc:
        return "bad", str(exc), None
    except Exception as exc:  # a preprocessing bug on one odd image must not stop the run
        return "bad", f"could not preprocess: {type(exc).__name__}: {exc}", None


def _thumbnail(image: object) -> bytes | None:
    try:
        return make_thumbnail(image)
    except Exception:  # a sample without a thumbnail is still a sample
        return None


def _prepare_group(group: list[Sample], encoder: Encoder, gpu_jpeg: bool) -> list[tuple[str, object, bytes | None]]:
    return [_prepare_with_thumbnail(sample, encoder, gpu_jpeg) for sample in group]


def _prepared_in_order(
    samples: Sequence[Sample],
    encoder: Encoder,
    pool: ThreadPoolExecutor,
    ahead: int,
    gpu_jpeg: bool,
    group_size: int,
) -> Iterator[tuple[Sample, tuple[str, object, bytes | None]]]:
    """Results in input order, with about ``ahead`` items in flight (bounded memory).

    Work is handed to the pool in groups: one future per item costs ~20 us of GIL-holding
    bookkeeping, which matters at thousands of images per second on a GPU."""
    queue: deque[tuple[list[Sample], Future]] = deque()
    items = iter(samples)

    def submit() -> bool:
        group = list(itertools.islice(items, group_size))
        if group:
            queue.append((group, pool.submit(_prepare_group, group, encoder, gpu_jpeg)))
        return bool(group)

    while len(queue) * group_size < ahead and submit():
        pass
    while queue:
        group, future = queue.popleft()
        submit()
        yield from zip(group, future.result(), strict=True)


def default_workers() -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(16, cpus))


@dataclass
class DecodePool:
    """The decode threads and their number (prefetch depth is sized from it)."""

    pool: ThreadPoolExecutor
    workers: int

    @classmethod
    def start(cls, num_workers: int | None = None) -> DecodePool:
        workers = num_workers or default_workers()
        return cls(ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode"), workers)

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)


# -- the unit of work -------------------------------------------------------------------------


def embed_chunk(
    samples: Sequence[Sample],
    encoder: Encoder,
    *,
    batch_size: int = 64,
    num_workers: int | None = None,
    decode: DecodePool | None = None,
    should_stop: Callable[[], bool] | None = None,
    on_batch: Tick | None = None,
    with_statistics: bool = True,
) -> ChunkResult:
    """Decode, preprocess and embed ``samples``; bad items become failures, never exceptions.

    ``on_batch(n)`` is told after each forward pass how many samples it settled (embedded or
    failed). ``should_stop`` is polled before each batch; when it fires the result is marked
    ``stopped`` (partial: do not store it)."""
    own_pool = decode is None
    if decode is None:
        decode = DecodePool.start(num_workers)
    gpu_jpeg = gpu_decode_supported(encoder.device, encoder.preprocessing)
    pinned = encoder.device.type == "cuda"
    ids: list[str] = []
    labels: list[str] = []
    parts: list[np.ndarray] = []
    failures: list[tuple[str, str]] = []
    thumbnail_of: dict[str, bytes | None] = {}  # sample IDs are unique within a chunk
    thumbnails: list[bytes | None] = []
    stopped = False
    batch: list[tuple[Sample, str, object]] = []
    settled = 0

    def flush() -> None:
        nonlocal batch, settled
        good = _embed_batch(batch, encoder, gpu_jpeg, pinned, failures)
        for (sample, _, _), features in good:
            ids.append(sample.sample_id)
            labels.append(sample.label or "")
            parts.append(features)
            thumbnails.append(thumbnail_of.pop(sample.sample_id, None))
        if on_batch:
            on_batch(settled + len(batch))
        settled = 0
        batch = []

    try:
        ahead = 2 * batch_size + decode.workers  # two batches queued behind the one in flight
        group_size = max(1, min(16, batch_size // (2 * decode.workers)))
        prepared = _prepared_in_order(samples, encoder, decode.pool, ahead, gpu_jpeg, group_size)
        for sample, (kind, payload, thumbnail) in prepared:
            if kind == "bad":
                failures.append((sample.sample_id, str(payload)))
                settled += 1
                continue
            if not batch and should_stop is not None and should_stop():
                stopped = True
                break
            batch.append((sample, kind, payload))
            thumbnail_of[sample.sample_id] = thumbnail
            if len(batch) >= batch_size:
                flush()
        if batch and not stopped:
            if should_stop is not None and should_stop():
                stopped = True
            else:
                flush()
        elif settled and on_batch and not stopped:
            on_batch(settled)
    finally:
        if own_pool:
            decode.close()
    dim = encoder.dim
    features = np.stack(parts).astype(np.float32) if parts else np.zeros((0, dim), np.float32)
    statistics = chunk_statistics(features, labels, ids) if with_statistics and not stopped else None
    return ChunkResult(ids, labels, features, failures, statistics, stopped, encoder.describe(), thumbnails)


def _embed_batch(
    batch: list[tuple[Sample, str, object]],
    encoder: Encoder,
    gpu_jpeg: bool,
    pinned: bool,
    failures: list[tuple[str, str]],
) -> list[tuple[tuple[Sample, str, object], np.ndarray]]:
    cpu_items = [item for item in batch if item[1] == "ok"]
    jpeg_items = [item for item in batch if item[1] == _GPU_JPEG]
    if jpeg_items:
        try:
            on_gpu = decode_batch_on_gpu([p for _, _, p in jpeg_items], encoder.preprocessing, encoder.device)
        except Exception:
            # nvJPEG refused something (CMYK, progressive corner cases): redo these on the CPU.
            redone = [(s, *_prepare(s, encoder, False)) for s, _, _ in jpeg_items]
            for s, kind, payload in redone:
                if kind == "bad":
                    failures.append((s.sample_id, str(payload)))
            cpu_items += [item for item in redone if item[1] == "ok"]
            jpeg_items, on_gpu = [], None
    ordered = jpeg_items + cpu_items
    if not ordered:
        return []
    pieces = []
    if jpeg_items:
        pieces.append(on_gpu)
    if cpu_items:
        cpu = torch.stack([p for _, _, p in cpu_items])  # type: ignore[misc]
        if pinned:
            cpu = cpu.pin_memory()  # page-locked: the host-to-device copy runs asynchronously
        pieces.append(cpu.to(encoder.device, non_blocking=True) if jpeg_items else cpu)
    tensor = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
    features = encoder.embed(tensor)
    if not np.isfinite(features).all():
        bad = ~np.isfinite(features).all(axis=1)
        for (s, _, _), is_bad in zip(ordered, bad, strict=True):
            if is_bad:
                failures.append((s.sample_id, "encoder produced NaN/inf features"))
        keep = [(item, f) for item, f, b in zip(ordered, features, bad, strict=True) if not b]
    else:
        keep = list(zip(ordered, features, strict=True))
    # Restore the input order (GPU-decoded items were moved to the front).
    position = {id(item[0]): i for i, item in enumerate(batch)}
    keep.sort(key=lambda pair: position[id(pair[0][0])])
    return keep


def chunk_statistics(features: np.ndarray, labels: Sequence[str], ids: Sequence[str]) -> SufficientStatistics | None:
    """Statistics of a chunk's L2-normalised labelled features (None when none is labelled)."""
    return add_labelled(None, features, np.asarray(labels, dtype=object), np.asarray(ids, dtype=object), normalize=True)


# -- executors ---------------------------------------------------------------------------------


class ChunkExecutor(Protocol):
    """A strategy that embeds a stream of chunks and yields one :class:`ChunkResult` per chunk,
    in input order (the driver stores them in that order)."""

    @property
    def encoder_record(self) -> dict | None:
        """The encoder's record when known before the first chunk (then a mismatch with the
        store fails before any work); else each result carries it."""

    def embed_chunks(
        self, chunks: Iterable[list[Sample]], *, tick: Tick, should_stop: Callable[[], bool] | None
    ) -> Iterator[ChunkResult]: ...

    def close(self) -> None: ...


class LocalExecutor:
    """Chunks embedded one after another in this process, with one decode pool for the run."""

    def __init__(self, encoder: Encoder, *, batch_size: int = 64, num_workers: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.encoder = encoder
        self.batch_size = batch_size
        self.decode = DecodePool.start(num_workers)

    @property
    def encoder_record(self) -> dict:
        return self.encoder.describe()

    def embed_chunks(
        self, chunks: Iterable[list[Sample]], *, tick: Tick, should_stop: Callable[[], bool] | None
    ) -> Iterator[ChunkResult]:
        for pending in chunks:
            # Statistics are left to the driver's side thread, off the path between forward passes.
            yield embed_chunk(
                pending, self.encoder, batch_size=self.batch_size, decode=self.decode,
                should_stop=should_stop, on_batch=tick, with_statistics=False,
            )

    def close(self) -> None:
        self.decode.close()


# -- the driver -------------------------------------------------------------------------------


def embed_source(
    samples: Iterable[Sample],
    executor: ChunkExecutor | Encoder,
    store: EmbeddingStore,
    *,
    total: int | None = None,
    chunk_size: int = 1024,
    batch_size: int = 64,
    num_workers: int | None = None,
    progress: Callable[[int, int | None], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> EmbedReport:
    """Embed every sample not yet in ``store``, one chunk at a time; resumable.

    ``executor``: a :class:`ChunkExecutor`, or an encoder (then a :class:`LocalExecutor` with
    ``batch_size`` and ``num_workers``, closed at the end). ``progress(done, total)`` counts
    samples settled in this call (embedded, failed or already present). Failures are listed
    beside the chunk they belong to (``EmbeddingStore.failures``); items that failed before are
    not retried on resume."""
    if chunk_size < 1 or batch_size < 1:
        raise ValueError("chunk_size and batch_size must be at least 1")
    started = time.perf_counter()
    own = isinstance(executor, Encoder)
    runner: ChunkExecutor = LocalExecutor(executor, batch_size=batch_size, num_workers=num_workers) if own else executor  # type: ignore[arg-type]
    report = EmbedReport()
    tick = SettledCounter(progress, total)
    # Statistics of each written chunk are accumulated on a side thread (BLAS releases the GIL),
    # off the path between forward passes: at GPU rates a 1280-d float64 update is not free.
    stats_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="statistics")
    first_chunk = store.next_index()
    early: deque[list[tuple[str, str]]] = deque()

    def pending_chunks() -> Iterator[list[Sample]]:
        for pending, early_failures in chunks_to_embed(samples, store, chunk_size, report, tick):
            early.append(early_failures)
            yield pending

    try:
        record = runner.encoder_record
        if record is not None:
            check_encoder_record(store, record)
        for result in runner.embed_chunks(pending_chunks(), tick=tick, should_stop=should_stop):
            if result.stopped:
                report.stopped = True
                break
            if record is None and result.encoder is not None:
                record = result.encoder
                check_encoder_record(store, record)
            store_chunk(
                store, result.sample_ids, result.labels, result.features, early.popleft() + result.failures, report,
                thumbnails=result.thumbnails,
            )
            stats_pool.submit(_accumulate, report, result)
            if should_stop is not None and should_stop():
                report.stopped = True
                break
    finally:
        if own:
            runner.close()
        stats_pool.shutdown(wait=True)
    extend_statistics_cache(store, first_chunk, first_chunk + report.chunks_written, report.statistics)
    report.seconds = time.perf_counter() - started
    return report


class SettledCounter:
    """Counts samples settled in this run (embedded, failed or already present) and reports
    ``progress(done, total)`` after each step."""

    def __init__(self, progress: Callable[[int, int | None], None] | None, total: int | None) -> None:
        self.progress = progress
        self.total = total
        self.done = 0

    def __call__(self, n: int) -> None:
        self.done += n
        if self.progress:
            self.progress(self.done, self.total)


# Encoded bytes gathered per chunk before it is decoded and embedded (memory per chunk in flight).
MAX_CHUNK_BYTES = 256 * 1024 * 1024


def chunks_to_embed(
    samples: Iterable[Sample],
    store: EmbeddingStore,
    chunk_size: int,
    report: EmbedReport,
    tick: Tick,
) -> Iterator[tuple[list[Sample], list[tuple[str, str]]]]:
    """Group the samples not yet in the store (embedded or listed as failed before) into chunks
    of ``chunk_size``, each with the duplicates found while filling it. A chunk also ends once
    its samples hold MAX_CHUNK_BYTES of encoded bytes (rows alone allowed 1024 x 64 MiB)."""
    known = set(store.sample_ids().tolist())
    known.update(sample_id for sample_id, _ in store.failures())
    seen: set[str] = set()
    pending: list[Sample] = []
    pending_bytes = 0
    early_failures: list[tuple[str, str]] = []
    for sample in samples:
        if sample.sample_id in known:
            report.skipped_existing += 1
            tick(1)
            continue
        if sample.sample_id in seen:
            early_failures.append((sample.sample_id, "duplicate sample id (first occurrence kept)"))
            tick(1)
            continue
        seen.add(sample.sample_id)
        pending.append(sample)
        pending_bytes += len(sample.data) if sample.data is not None else 0
        if len(pending) >= chunk_size or pending_bytes >= MAX_CHUNK_BYTES:
            yield pending, early_failures
            pending, early_failures, pending_bytes = [], [], 0
    if pending or early_failures:
        yield pending, early_failures


def store_chunk(
    store: EmbeddingStore,
    sample_ids: Sequence[str],
    labels: Sequence[str],
    features: np.ndarray,
    failures: list[tuple[str, str]],
    report: EmbedReport,
    *,
    thumbnails: Sequence[bytes | None] | None = None,
) -> None:
    """Write one finished chunk, its failures and its thumbnails. Those first, chunk last: the
    chunk file marks the set complete (a failures or thumbnails file whose chunk is missing does
    not count, and the next run rewrites it)."""
    index = store.next_index()
    store.write_failures(index, failures)
    if thumbnails is not None:
        ThumbnailStore(store.directory).write(index, sample_ids, thumbnails)
    store.write_chunk(index, sample_ids, labels, features)
    report.embedded += len(sample_ids)
    report.failures.extend(failures)
    report.chunks_written += 1


def _accumulate(report: EmbedReport, result: ChunkResult) -> None:
    # Runs on the single statistics thread, so updates to report.statistics are serialised.
    if result.statistics is not None:  # computed by the executor (a Ray actor)
        if report.statistics is None:
            report.statistics = result.statistics
        else:
            report.statistics.merge_in_place(result.statistics)
        return
    report.statistics = add_labelled(
        report.statistics,
        result.features,
        np.asarray(result.labels, dtype=object),
        np.asarray(result.sample_ids, dtype=object),
        normalize=True,
    )  # in place: no copy of the running D x D moments per chunk


def check_encoder_record(store: EmbeddingStore, record: dict) -> None:
    """Record the encoder (its ``describe()``) with the first chunk; refuse to mix features of
    different encoders."""
    previous = store.encoder_record()
    if previous is not None:
        if (previous.get("name"), previous.get("weights_sha256")) != (record["name"], record["weights_sha256"]):
            raise EncoderError(
                f"this embedding set was made with {previous.get('name')} "
                f"(weights {str(previous.get('weights_sha256'))[:12]}); embedding more items with "
                f"{record['name']} (weights {record['weights_sha256'][:12]}) would mix feature "
                "spaces. Use the same encoder, or a new dataset / work directory."
            )
        return
    if store.chunk_indices():
        return  # features from elsewhere (uploaded); nothing to compare against
    store.write_encoder_record(record)
