"""A manifest: CSV, JSONL or Parquet with columns ``path``, ``label`` and optionally ``id``.

Relative paths resolve against the manifest's directory. Rows are streamed (Parquet by record
batch), so a manifest of millions of rows is never held whole.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

from service.ingest.sample import ReaderError, Sample, SampleSource

MANIFEST_SUFFIXES = (".csv", ".jsonl", ".parquet")


class ManifestSource(SampleSource):
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.description = f"manifest {self.path}"
        self.kind = self.path.suffix.lower()
        if self.kind not in MANIFEST_SUFFIXES:
            raise ReaderError(f"manifest must be .csv, .jsonl or .parquet, got {self.path.name!r}")

    def _rows(self) -> Iterator[tuple[int, dict]]:
        if self.kind == ".csv":
            with open(self.path, newline="", encoding="utf-8-sig") as fh:
                reader = csv.DictReader(fh)
                _check_columns(reader.fieldnames or [], self.path)
                for number, row in enumerate(reader, start=2):
                    yield number, row
        elif self.kind == ".jsonl":
            with open(self.path, encoding="utf-8") as fh:
                for number, line in enumerate(fh, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        yield number, {"__error__": f"invalid JSON on line {number}: {exc.msg}"}
                        continue
                    yield number, row if isinstance(row, dict) else {"__error__": "not an object"}
        else:
            import pyarrow.parquet as pq

            parquet = pq.ParquetFile(self.path)
            _check_columns(parquet.schema_arrow.names, self.path)
            number = 0
            for batch in parquet.iter_batches(batch_size=8192):
                for row in batch.to_pylist():
                    number += 1
                    yield number, row

    def __iter__(self) -> Iterator[Sample]:
        base = self.path.parent
        for number, row in self._rows():
            if "__error__" in row:
                yield Sample(f"{self.path.name}:{number}", None, error=row["__error__"])
                continue
            path = row.get("path")
            label = row.get("label")
            label = None if label is None or str(label) == "" else str(label)
            sample_id = row.get("id")
            if path is None or str(path) == "":
                yield Sample(str(sample_id or f"{self.path.name}:{number}"), label, error="row has no path")
                continue
            path = str(path)
            sample_id = path if sample_id is None or str(sample_id) == "" else str(sample_id)
            if "://" in path:
                yield Sample(sample_id, label, error="URLs are not supported; give a local path")
                continue
            full = Path(path) if Path(path).is_absolute() else base / path
            yield Sample(sample_id, label, path=str(full))

    def count(self) -> int | None:
        if self.kind == ".parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(self.path).metadata.num_rows
        return sum(1 for _ in self._rows())


def _check_columns(names: list[str], path: Path) -> None:
    if "path" not in names:
        raise ReaderError(
            f"manifest {path.name} needs a 'path' column (and 'label', optionally 'id'); "
            f"found columns {names}"
        )
