"""One sample's evidence, its thumbnail, the 2-D map, and the embeddings export: what the
dashboard reads (each usable without it)."""

from __future__ import annotations

import io
import json
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from service import schemas
from service.errors import Conflict, InvalidInput, NotFound, TooLarge
from service.storage import layout
from service.storage.embeddings import EmbeddingStore
from service.storage.files import load_npz
from service.storage.fits import FitFiles
from service.storage.scores import score_table
from service.storage.thumbnails import NoThumbnails, ThumbnailStore
from service.usecases.context import AppContext
from service.usecases.datasets import require_dataset
from service.usecases.scores import current_fit

MAX_MAP_ROWS = 1000  # rows per /map/rows request: a gallery page or a box selection's first page
NO_THUMBNAILS = (
    "this dataset has no thumbnails: its features were uploaded as embeddings (or embedded "
    "before thumbnails were made), so there is no image to show"
)

# -- one sample -------------------------------------------------------------------------------


def _chunk_starts(fit_id: str, store: EmbeddingStore, num_chunks: int) -> np.ndarray:
    """Cumulative row counts of the fit's chunks (IDs members only), kept per fit."""
    with _lock:
        if fit_id in _starts:
            return _starts[fit_id]
    sizes = [len(load_npz(store.path(i), keys=("sample_ids",))["sample_ids"]) for i in store.chunk_indices()[:num_chunks]]
    starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    with _lock:
        _starts[fit_id] = starts
        while len(_starts) > 8:
            _starts.popitem(last=False)
    return starts


_starts: OrderedDict[str, np.ndarray] = OrderedDict()
_lock = threading.Lock()


def _score_rows(files: FitFiles, sample_ids: list[str]) -> dict[str, dict[str, Any]]:
    """The score-table rows of these samples (one hash pass over the ID column)."""
    table = score_table(files.directory)
    mask = pc.is_in(table.column("sample_id"), value_set=pa.array(sample_ids, pa.string()))
    return {row["sample_id"]: row for row in table.filter(mask).to_pylist()}


def sample_detail(ctx: AppContext, tenant: str, dataset_id: str, sample_id: str, k: int) -> schemas.SampleDetail:
    fit, files = current_fit(ctx, tenant, dataset_id)
    store_dir = layout.store_dir(ctx.settings.data_dir, dataset_id)
    num_chunks = files.num_chunks()
    index = ctx.indexes.get(fit.id, store_dir, num_chunks)
    row = index.row_of.get(sample_id)
    if row is None:
        raise NotFound(f"sample {sample_id[:200]!r} is not in this dataset's current fit")
    model = ctx.model(dataset_id, fit.id)
    # The stored (unnormalised) feature: the model scores in the space it was fitted on.
    store = EmbeddingStore(store_dir)
    starts = _chunk_starts(fit.id, store, num_chunks)
    chunk = int(np.searchsorted(starts, row, side="right")) - 1
    feature = store.read_chunk(store.chunk_indices()[chunk]).features[row - int(starts[chunk])]
    classes = [str(c) for c in model.classes]
    # The sample against every class at once: K copies, each labelled with one class.
    every = model.score(np.repeat(feature[None, :], len(classes), axis=0), classes)
    distances = sorted(
        (
            schemas.ClassDistance(label=c, rmd=float(every["rmd"][i]), md_class=float(every["md_class"][i]))
            for i, c in enumerate(classes)
        ),
        key=lambda d: d.rmd,
    )
    neighbors = index.neighbors(sample_id, k)
    rows = _score_rows(files, [sample_id] + [str(n["sample_id"]) for n in neighbors])
    own = rows.get(sample_id)
    label = str(index.labels[row]) or None
    try:
        has_thumbnail = ThumbnailStore(store_dir).get(sample_id) is not None
    except NoThumbnails:
        has_thumbnail = False
    return schemas.SampleDetail(
        fit_id=fit.id,
        sample_id=sample_id,
        label=label,
        predicted_label=str(own["predicted_label"]) if own else str(every["predicted_label"][0]),
        scores=own,
        class_distances=distances,
        neighbors=[schemas.SampleNeighbor(**n, scores=rows.get(str(n["sample_id"]))) for n in neighbors],
        has_thumbnail=has_thumbnail,
    )


def thumbnail(ctx: AppContext, tenant: str, dataset_id: str, sample_id: str) -> bytes:
    require_dataset(ctx, tenant, dataset_id)
    try:
        data = ThumbnailStore(layout.store_dir(ctx.settings.data_dir, dataset_id)).get(sample_id)
    except NoThumbnails:
        raise NotFound(NO_THUMBNAILS) from None
    if data is None:
        raise NotFound(f"no thumbnail for sample {sample_id[:200]!r} (unknown sample, or its image could not be made small)")
    return data


# -- the map ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackedMap:
    fit_id: str
    body: bytes


def _quantize(values: np.ndarray) -> tuple[np.ndarray, list[float]]:
    lo, hi = (float(values.min()), float(values.max())) if len(values) else (0.0, 0.0)
    span = hi - lo if hi > lo else 1.0
    q = np.rint((values.astype(np.float64) - lo) / span * 65535.0).astype("<u2")
    return q, [lo, hi]


def pack_map(fit_id: str, files: FitFiles, *, thumbnails: bool = False) -> bytes:
    """The map in one compact body (10 bytes a point, 12 with the label-issue flag)::

        uint32 little-endian L, then L bytes of JSON (padded with spaces to a multiple of 8):
          {"count": n, "labels": [...], "x": [lo, hi], "y": [lo, hi], "rmd": [lo, hi], "fit_id": ...,
           "thumbnails": whether the samples have thumbnails, "arrays": the names below in order}
        then one little-endian uint16 array of n per name in "arrays": x, y, rmd (each value =
        lo + q / 65535 * (hi - lo)), label, predicted_label (indices into "labels"), and
        is_label_issue (0/1) where the fit has the label-issue columns.

    Row i is row i of the score table sorted by (rmd, sample_id): fetch its sample ID and scores
    with GET .../map/rows?rows=i."""
    xy = files.map_xy()
    if xy is None:
        raise Conflict("this fit has no map (it was made before maps existed): fit the dataset again")
    table = score_table(files.directory)
    # Dictionary-encode the label columns (one hash pass in Arrow): no sort of a million strings.
    encoded = {name: pc.dictionary_encode(table.column(name).combine_chunks()) for name in ("label", "predicted_label")}
    classes = np.union1d(*(np.asarray(e.dictionary.to_pylist(), dtype=str) for e in encoded.values()))
    x, x_range = _quantize(xy[:, 0])
    y, y_range = _quantize(xy[:, 1])
    rmd, rmd_range = _quantize(table.column("rmd").to_numpy())
    arrays = {"x": x, "y": y, "rmd": rmd}
    for name, column in encoded.items():
        lookup = np.searchsorted(classes, np.asarray(column.dictionary.to_pylist(), dtype=str)).astype("<u2")
        arrays[name] = lookup[column.indices.to_numpy(zero_copy_only=False)]
    if "is_label_issue" in table.column_names:
        flags = pc.fill_null(table.column("is_label_issue"), False).to_numpy(zero_copy_only=False)
        arrays["is_label_issue"] = np.asarray(flags, dtype="<u2")
    header = json.dumps(
        {"count": int(table.num_rows), "labels": classes.tolist(), "x": x_range, "y": y_range,
         "rmd": rmd_range, "fit_id": fit_id, "thumbnails": thumbnails, "arrays": list(arrays)}
    ).encode()
    header += b" " * (-(len(header) + 4) % 8)
    return b"".join([np.uint32(len(header)).astype("<u4").tobytes(), header] + [a.tobytes() for a in arrays.values()])


_maps: OrderedDict[str, bytes] = OrderedDict()
MAPS_KEPT = 2


def packed_map(ctx: AppContext, tenant: str, dataset_id: str) -> PackedMap:
    fit, files = current_fit(ctx, tenant, dataset_id)
    with _lock:
        body = _maps.get(fit.id)
    if body is None:
        # A fit's files never change: one packing per fit.
        has_thumbnails = bool(ThumbnailStore(layout.store_dir(ctx.settings.data_dir, dataset_id)).indices())
        body = pack_map(fit.id, files, thumbnails=has_thumbnails)
        with _lock:
            _maps[fit.id] = body
            while len(_maps) > MAPS_KEPT:
                _maps.popitem(last=False)
    return PackedMap(fit.id, body)


def map_arrow(ctx: AppContext, tenant: str, dataset_id: str) -> tuple[str, Iterator[bytes]]:
    """The map with sample IDs and scores as an Arrow IPC stream (for notebooks)."""
    fit, files = current_fit(ctx, tenant, dataset_id)
    xy = files.map_xy()
    if xy is None:
        raise Conflict("this fit has no map (it was made before maps existed): fit the dataset again")
    table = score_table(files.directory).select(["sample_id", "label", "rmd", "predicted_label"])
    table = table.append_column("x", pa.array(xy[:, 0])).append_column("y", pa.array(xy[:, 1]))
    return fit.id, _ipc_stream(table.schema, iter(table.to_batches(max_chunksize=65536)))


def map_rows(ctx: AppContext, tenant: str, dataset_id: str, rows_text: str) -> schemas.MapRows:
    try:
        rows = [int(r) for r in rows_text.split(",") if r.strip()]
    except ValueError:
        raise InvalidInput("rows: comma-separated row numbers of the map, e.g. rows=0,5,17") from None
    if len(rows) > MAX_MAP_ROWS:
        raise TooLarge(f"at most {MAX_MAP_ROWS} rows per request (got {len(rows)}): page through a selection")
    fit, files = current_fit(ctx, tenant, dataset_id)
    table = score_table(files.directory)
    bad = [r for r in rows if not 0 <= r < table.num_rows]
    if bad:
        raise InvalidInput(f"row {bad[0]} is outside the map (0..{table.num_rows - 1})")
    items = table.take(pa.array(rows, pa.int64())).to_pylist() if rows else []
    return schemas.MapRows(fit_id=fit.id, rows=rows, items=items)


# -- the embeddings export --------------------------------------------------------------------


class _Drain:
    """A write-only file whose bytes are taken out as they arrive (for streamed bodies)."""

    closed = False

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.taken = 0

    def write(self, data) -> int:  # type: ignore[no-untyped-def]
        self.parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def tell(self) -> int:  # the Parquet writer asks where it is
        return sum(len(p) for p in self.parts) + self.taken

    def take(self) -> bytes:
        data = b"".join(self.parts)
        self.parts.clear()
        self.taken += len(data)
        return data


def _ipc_stream(schema: pa.Schema, batches: Iterator[pa.RecordBatch]) -> Iterator[bytes]:
    drain = _Drain()
    writer = pa.ipc.new_stream(pa.PythonFile(drain, mode="w"), schema)
    yield drain.take()
    for batch in batches:
        writer.write_batch(batch)
        yield drain.take()
    writer.close()
    yield drain.take()


EXPORT_MEDIA = {
    "npy": "application/octet-stream",
    "arrow": "application/vnd.apache.arrow.stream",
    "parquet": "application/vnd.apache.parquet",
}


def _export_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [("sample_id", pa.string()), ("label", pa.string()), ("features", pa.list_(pa.float32(), dim))]
    )


def _batch(chunk: Any, schema: pa.Schema, dim: int) -> pa.RecordBatch:
    features = pa.FixedSizeListArray.from_arrays(pa.array(chunk.features.reshape(-1), pa.float32()), dim)
    labels = pa.array(chunk.labels.tolist(), pa.string())
    labels = pc.if_else(pc.equal(labels, ""), pa.scalar(None, pa.string()), labels)  # unlabelled: null
    return pa.RecordBatch.from_arrays([pa.array(chunk.sample_ids.tolist(), pa.string()), labels, features], schema=schema)


def embeddings_export(ctx: AppContext, tenant: str, dataset_id: str, fmt: str) -> Iterator[bytes]:
    """The dataset's stored features with sample IDs and labels, one chunk in memory at a time.

    npy: one structured array (fields sample_id, label: fixed-width text; features: float32 (D,)),
    read with ``np.load(path)["features"]``; arrow: an IPC stream; parquet: one row group a chunk.
    The generator is started here, so a dataset without embeddings fails before any byte is sent."""
    require_dataset(ctx, tenant, dataset_id)
    store = EmbeddingStore(layout.store_dir(ctx.settings.data_dir, dataset_id))
    indices = store.chunk_indices()
    if not indices:
        raise Conflict("the dataset has no embeddings yet: upload items and fit it first")
    first = store.read_chunk(indices[0])
    dim = int(first.features.shape[1])
    stream = {"npy": _npy_stream, "arrow": _arrow_stream, "parquet": _parquet_stream}[fmt](store, indices, dim)
    return stream


def _chunks(store: EmbeddingStore, indices: list[int]) -> Iterator[Any]:
    for index in indices:
        yield store.read_chunk(index)


def _npy_stream(store: EmbeddingStore, indices: list[int], dim: int) -> Iterator[bytes]:
    # The header needs N and the text widths up front: one pass over the small ID/label members.
    count, id_width, label_width = 0, 1, 1
    for index in indices:
        small = load_npz(store.path(index), keys=("sample_ids", "labels"))
        count += len(small["sample_ids"])
        id_width = max(id_width, small["sample_ids"].dtype.itemsize // 4)
        label_width = max(label_width, small["labels"].dtype.itemsize // 4)
    dtype = np.dtype([("sample_id", f"<U{id_width}"), ("label", f"<U{label_width}"), ("features", "<f4", (dim,))])
    header = io.BytesIO()
    np.lib.format.write_array_header_2_0(
        header, {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": (count,)}
    )
    yield header.getvalue()
    for chunk in _chunks(store, indices):
        records = np.empty(len(chunk.sample_ids), dtype=dtype)
        records["sample_id"] = chunk.sample_ids
        records["label"] = chunk.labels
        records["features"] = chunk.features
        yield records.tobytes()


def _arrow_stream(store: EmbeddingStore, indices: list[int], dim: int) -> Iterator[bytes]:
    schema = _export_schema(dim)
    yield from _ipc_stream(schema, (_batch(c, schema, dim) for c in _chunks(store, indices)))


def _parquet_stream(store: EmbeddingStore, indices: list[int], dim: int) -> Iterator[bytes]:
    schema = _export_schema(dim)
    drain = _Drain()
    writer = pq.ParquetWriter(pa.PythonFile(drain, mode="w"), schema)
    for chunk in _chunks(store, indices):
        writer.write_batch(_batch(chunk, schema, dim))
        yield drain.take()
    writer.close()
    yield drain.take()
