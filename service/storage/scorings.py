"""One archive-scoring job's files, in its folder under the dataset (``layout.scoring_dir``):
what the job reads while it runs, and the result it leaves.

    archive          the archive as received (zip or tar[.gz]); removed when the job ends
    embeddings/      its features while the job runs (an ``EmbeddingStore``: a job taken over by
                     another worker resumes after the last chunk); removed with the archive
    failures.json    [[sample_id, reason], ...]: members that could not be embedded
    result.arrow     the scores, one row per embedded member in archive order (Arrow IPC file,
                     one record batch, memory-mapped on read; the columns of ``NewItemScore``)

The result file is written last, atomically: it exists only once the result is complete. Pages
are row offsets into it (the file never changes once written).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa

from service.storage.files import (
    atomic_write,
    atomic_write_bytes,
    decode_token,
    encode_token,
    fsync_dir,
    mapped_arrow_file,
)
from service.storage.scores import CursorError

ARCHIVE = "archive"
STORE = "embeddings"
FAILURES = "failures.json"
RESULT = "result.arrow"
ARROW_FILE = "application/vnd.apache.arrow.file"


def encode_offset(offset: int) -> str:
    return encode_token(f"row:{offset}".encode())


def decode_offset(token: str) -> int:
    try:
        raw = decode_token(token).decode()
        prefix, _, number = raw.partition(":")
        offset = int(number)
        if prefix != "row" or offset < 0:
            raise ValueError
    except Exception:
        raise CursorError("cursor is malformed: pass back a next_cursor value unchanged") from None
    return offset


class ScoringFiles:
    """One scoring job's folder: filled by the request (the archive), used and emptied by the
    job, read by the result route."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    # -- the request ---------------------------------------------------------------------------

    def accept(self, received: Path) -> None:
        """Move the received archive in (same file system: a rename), durably."""
        self.directory.mkdir(parents=True)
        received.rename(self.directory / ARCHIVE)
        fsync_dir(self.directory)
        fsync_dir(self.directory.parent)

    # -- the job -------------------------------------------------------------------------------

    @property
    def archive(self) -> Path:
        return self.directory / ARCHIVE

    @property
    def store_dir(self) -> Path:
        return self.directory / STORE

    def write_result(self, table: pa.Table, failures: list[tuple[str, str]]) -> None:
        atomic_write_bytes(self.directory / FAILURES, json.dumps([list(f) for f in failures]).encode())

        def write(fh) -> None:  # type: ignore[no-untyped-def]
            with pa.ipc.new_file(fh, table.schema) as writer:
                writer.write_table(table, max_chunksize=max(table.num_rows, 1))

        atomic_write(self.directory / RESULT, write)

    def remove_inputs(self) -> None:
        """The archive and its embeddings: needed only while the job runs."""
        self.archive.unlink(missing_ok=True)
        shutil.rmtree(self.store_dir, ignore_errors=True)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)

    # -- the result ----------------------------------------------------------------------------

    @property
    def result_path(self) -> Path:
        return self.directory / RESULT

    def has_result(self) -> bool:
        return self.result_path.exists()

    def num_rows(self) -> int:
        return mapped_arrow_file(str(self.result_path)).num_rows

    def page(self, *, limit: int, cursor: str | None) -> tuple[list[dict[str, Any]], str | None]:
        """Rows in archive order from the cursor; the next cursor, or None after the last row."""
        table = mapped_arrow_file(str(self.result_path))
        start = decode_offset(cursor) if cursor else 0
        stop = min(table.num_rows, start + limit)
        rows = table.slice(start, max(stop - start, 0)).to_pylist()
        return rows, encode_offset(stop) if stop < table.num_rows else None

    def failures(self) -> list[tuple[str, str]]:
        path = self.directory / FAILURES
        return [(str(a), str(b)) for a, b in json.loads(path.read_text())] if path.exists() else []
