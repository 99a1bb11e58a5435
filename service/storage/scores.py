"""Score tables of a fit on disk, and keyset pages over them.

Measured choice (see docs/api.md): scores live in Arrow IPC files under the fit's folder, not in
the database. Two copies, each one record batch, memory-mapped on read:

    scores.arrow     sorted by (rmd, sample_id)           -> pages over all samples
    by_label.arrow   sorted by (label, rmd, sample_id)    -> pages with a label filter
    labels.json      {label: [start, stop)} rows of each label in by_label.arrow
    label_issues.arrow  sorted by (label_issue_log_odds, sample_id) -> the label-issue report,
                     most likely issue first (fits with label-issue columns only)

A page is a binary search for the cursor's (rmd, sample_id) followed by a slice: O(log N) at any
cursor position, no OFFSET scan and no per-row database rows for 1M-sample datasets.
"""

from __future__ import annotations

import bisect
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from service.errors import BadRequest
from service.storage.files import (
    atomic_write,
    atomic_write_bytes,
    decode_token,
    encode_token,
    mapped_arrow_file,
)

SCORES_FILE = "scores.arrow"
BY_LABEL_FILE = "by_label.arrow"
LABELS_FILE = "labels.json"
PARQUET_FILE = "scores.parquet"
LABEL_ISSUES_FILE = "label_issues.arrow"
# The label-issue report's ranking key: log-odds of a wrong label, which keeps an order among
# probabilities that round to 0 or 1 (stored in the report file only).
ISSUE_KEY = "label_issue_log_odds"
ISSUE_COLUMNS = ("sample_id", "label", "suggested_label", "suggested_label_probability",
                 "label_issue_probability", "is_label_issue", "rmd")
EXPORT_BATCH_ROWS = 65536


class CursorError(BadRequest):
    """The cursor is not one this service handed out."""


@dataclass(frozen=True)
class Cursor:
    rmd: float
    sample_id: str

    def encode(self) -> str:
        raw = json.dumps({"r": self.rmd.hex(), "s": self.sample_id}, separators=(",", ":"))
        return encode_token(raw.encode())

    @classmethod
    def decode(cls, token: str) -> Cursor:
        try:
            raw = decode_token(token)
            data = json.loads(raw)
            rmd = float.fromhex(data["r"])
            sample_id = data["s"]
            if not isinstance(sample_id, str) or math.isnan(rmd):
                raise ValueError
        except Exception:
            raise CursorError("cursor is malformed: pass back a next_cursor value unchanged") from None
        return cls(rmd, sample_id)


def _write_ipc(path: Path, table: pa.Table) -> None:
    def write(fh) -> None:  # type: ignore[no-untyped-def]
        with pa.ipc.new_file(fh, table.schema) as writer:
            writer.write_table(table, max_chunksize=max(table.num_rows, 1))

    atomic_write(path, write)


def write_score_files(directory: Path, scores: pa.Table, issue_log_odds: np.ndarray | None = None) -> None:
    """Write the sorted copies of ``scores`` (columns as produced by the fit) into ``directory``;
    with ``issue_log_odds`` (row-aligned) also the label-issue report."""
    directory.mkdir(parents=True, exist_ok=True)
    if issue_log_odds is not None:
        report = scores.select(list(ISSUE_COLUMNS)).append_column(ISSUE_KEY, pa.array(issue_log_odds, pa.float64()))
        report = report.take(pc.sort_indices(report, [(ISSUE_KEY, "ascending"), ("sample_id", "ascending")]))
        _write_ipc(directory / LABEL_ISSUES_FILE, report.combine_chunks())
        del report
    by_rmd = scores.take(pc.sort_indices(scores, [("rmd", "ascending"), ("sample_id", "ascending")]))
    _write_ipc(directory / SCORES_FILE, by_rmd.combine_chunks())
    del by_rmd
    by_label = scores.take(
        pc.sort_indices(
            scores, [("label", "ascending"), ("rmd", "ascending"), ("sample_id", "ascending")]
        )
    ).combine_chunks()
    labels = by_label.column("label").to_numpy(zero_copy_only=False)
    offsets: dict[str, list[int]] = {}
    if len(labels):
        starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]])
        stops = np.r_[starts[1:], len(labels)]
        offsets = {str(labels[a]): [int(a), int(b)] for a, b in zip(starts, stops, strict=True)}
    _write_ipc(directory / BY_LABEL_FILE, by_label)
    atomic_write_bytes(directory / LABELS_FILE, json.dumps(offsets).encode())


@lru_cache(maxsize=16)
def _label_offsets(path: str) -> dict[str, list[int]]:
    return json.loads(Path(path).read_text())


@lru_cache(maxsize=16)
def _key(path: str, column: str = "rmd") -> np.ndarray:
    values = mapped_arrow_file(path).column(column)
    return values.chunk(0).to_numpy() if values.num_chunks == 1 else values.to_numpy()


def _position(table: pa.Table, rmd: np.ndarray, lo: int, hi: int, cursor: Cursor, *, after: bool) -> int:
    """In [lo, hi), sorted by (key, sample_id): the first row greater than the cursor
    (``after``), or one past the last row smaller than it (not ``after``). The cursor's ``rmd``
    is the key of the file paged (rmd for score pages)."""
    start = lo + int(np.searchsorted(rmd[lo:hi], cursor.rmd, side="left"))
    stop = lo + int(np.searchsorted(rmd[lo:hi], cursor.rmd, side="right"))
    if start == stop:
        return start
    # Equal rmd values: ordered by sample_id; usually one or two rows.
    ids = table.column("sample_id").slice(start, stop - start).to_pylist()
    return start + (bisect.bisect_right if after else bisect.bisect_left)(ids, cursor.sample_id)


def page(
    directory: Path, *, limit: int, cursor: Cursor | None, descending: bool, label: str | None
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of scores ordered by (rmd, sample_id), ascending or descending."""
    if label is None:
        path = str(directory / SCORES_FILE)
        table = mapped_arrow_file(path)
        lo, hi = 0, table.num_rows
    else:
        path = str(directory / BY_LABEL_FILE)
        table = mapped_arrow_file(path)
        lo, hi = _label_offsets(str(directory / LABELS_FILE)).get(label, (0, 0))
    return _page(table, _key(path), lo, hi, limit=limit, cursor=cursor, descending=descending)


def _page(
    table: pa.Table, rmd: np.ndarray, lo: int, hi: int, *, limit: int, cursor: Cursor | None, descending: bool,
    drop: tuple[str, ...] = (),
) -> tuple[list[dict[str, Any]], str | None]:
    """Rows [lo, hi) of ``table`` sorted by (key ``rmd``, sample_id), one page from the cursor."""
    if descending:
        end = hi if cursor is None else _position(table, rmd, lo, hi, cursor, after=False)
        begin = max(lo, end - limit)
        rows = table.slice(begin, end - begin).to_pylist()[::-1]
        more = begin > lo
    else:
        begin = lo if cursor is None else _position(table, rmd, lo, hi, cursor, after=True)
        end = min(hi, begin + limit)
        rows = table.slice(begin, end - begin).to_pylist()
        more = end < hi
    # Rows are already JSON-clean: scores are finite and a missing knn_agreement is null.
    items = rows
    for row in items if drop else ():
        for column in drop:
            del row[column]
    next_cursor = None
    if more and items:
        last = items[-1]
        next_cursor = Cursor(float(rmd[begin if descending else end - 1]), last["sample_id"]).encode()
    return items, next_cursor


def has_label_issues(directory: Path) -> bool:
    return (directory / LABEL_ISSUES_FILE).exists()


def label_issue_page(
    directory: Path, *, limit: int, cursor: Cursor | None, flagged_only: bool, threshold_log_odds: float
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of the label-issue report, most likely issue first; with ``flagged_only`` only
    rows at or above the flagging threshold (given as log-odds)."""
    path = str(directory / LABEL_ISSUES_FILE)
    table = mapped_arrow_file(path)
    key = _key(path, ISSUE_KEY)
    lo = int(np.searchsorted(key, threshold_log_odds, side="left")) if flagged_only else 0
    return _page(table, key, lo, table.num_rows, limit=limit, cursor=cursor, descending=True, drop=(ISSUE_KEY,))


def score_table(directory: Path) -> pa.Table:
    return mapped_arrow_file(str(directory / SCORES_FILE))


class _Drain:
    """A write-only file whose bytes are taken out as they arrive (for streaming responses)."""

    closed = False

    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def write(self, data) -> int:  # type: ignore[no-untyped-def]
        self.parts.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        pass

    def take(self) -> bytes:
        data = b"".join(self.parts)
        self.parts.clear()
        return data


def arrow_stream(directory: Path) -> Iterator[bytes]:
    """The whole table as an Arrow IPC stream, batch by batch (constant memory per batch)."""
    table = score_table(directory)
    drain = _Drain()
    writer = pa.ipc.new_stream(pa.PythonFile(drain, mode="w"), table.schema)
    yield drain.take()
    for batch in table.to_batches(max_chunksize=EXPORT_BATCH_ROWS):
        writer.write_batch(batch)
        yield drain.take()
    writer.close()
    yield drain.take()


def csv_stream(directory: Path) -> Iterator[bytes]:
    table = score_table(directory)
    first = True
    for batch in table.to_batches(max_chunksize=EXPORT_BATCH_ROWS):
        sink = pa.BufferOutputStream()
        pacsv.write_csv(
            pa.Table.from_batches([batch]), sink, pacsv.WriteOptions(include_header=first)
        )
        first = False
        yield sink.getvalue().to_pybytes()


def parquet_path(directory: Path) -> Path:
    """The table as Parquet, written once per fit on first request (atomic)."""
    path = directory / PARQUET_FILE
    if not path.exists():
        table = score_table(directory)
        atomic_write(path, lambda fh: pq.write_table(table, fh))
    return path


def class_summary(scores: pa.Table) -> list[dict[str, Any]]:
    """Per class: count, rmd mean and percentiles, share whose predicted_label differs."""
    labels = scores.column("label").to_numpy(zero_copy_only=False)
    predicted = scores.column("predicted_label").to_numpy(zero_copy_only=False)
    rmd = scores.column("rmd").to_numpy()
    order = np.argsort(labels, kind="stable")
    labels, predicted, rmd = labels[order], predicted[order], rmd[order]
    flagged = (
        scores.column("is_label_issue").to_numpy(zero_copy_only=False)[order]
        if "is_label_issue" in scores.column_names
        else None
    )
    out = []
    starts = np.flatnonzero(np.r_[True, labels[1:] != labels[:-1]]) if len(labels) else []
    bounds = list(starts) + [len(labels)]
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        values = rmd[a:b]
        p = np.percentile(values, [10, 50, 90, 99])
        out.append(
            {
                "label": str(labels[a]),
                "count": int(b - a),
                "rmd_mean": float(values.mean()),
                "rmd_p10": float(p[0]),
                "rmd_p50": float(p[1]),
                "rmd_p90": float(p[2]),
                "rmd_p99": float(p[3]),
                "predicted_differs": float(np.mean(predicted[a:b] != labels[a:b])),
                "label_issues": None if flagged is None else int(flagged[a:b].sum()),
            }
        )
    return out
