"""Embeddings of one dataset on disk: numbered chunks, each written atomically.

Every file of a store directory is owned here::

    chunk-000000.npz                 sample_ids (str), labels (str; "" = unlabelled), features (float32 n x D)
    failures-000000.json             [[sample_id, reason], ...]: items skipped while making chunk 0
    encoder.json                     the encoder that made the features (name, weights SHA-256, ...)
    stats-normalized-upto-000012.npz sufficient statistics of chunks 0..11 (a cache; "raw" when
                                     fitted without L2 normalisation)

(``thumbs-NNNNNN.npz`` files in the same folder belong to ``storage.thumbnails``.)

A chunk file exists only once it is complete (temp file + rename), so an interrupted run
resumes after the last chunk present. Chunk numbers are dense: the store refuses gaps. A
failures file counts only once its chunk exists (it is written first).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.storage.files import atomic_savez, atomic_write_bytes, load_npz

_CHUNK = re.compile(r"^chunk-(\d{6})\.npz$")
_FAILURES = re.compile(r"^failures-(\d{6})\.json$")
ENCODER_RECORD = "encoder.json"


@dataclass(frozen=True)
class Chunk:
    index: int
    sample_ids: np.ndarray  # (n,) str
    labels: np.ndarray  # (n,) str, "" where unlabelled
    features: np.ndarray  # (n, D) float32


class EmbeddingStore:
    """Append-only chunked feature matrix with sample IDs and labels."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def chunk_indices(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        found = sorted(
            int(m.group(1)) for p in self.directory.iterdir() if (m := _CHUNK.match(p.name))
        )
        return found

    def next_index(self) -> int:
        indices = self.chunk_indices()
        return indices[-1] + 1 if indices else 0

    def path(self, index: int) -> Path:
        return self.directory / f"chunk-{index:06d}.npz"

    def write_chunk(
        self,
        index: int,
        sample_ids: Sequence[str],
        labels: Sequence[str | None],
        features: np.ndarray,
    ) -> Chunk:
        features = np.ascontiguousarray(features, dtype=np.float32)
        if features.ndim != 2 or not features.shape[0] == len(sample_ids) == len(labels):
            raise ValueError(
                f"a chunk needs as many sample_ids ({len(sample_ids)}) and labels ({len(labels)}) "
                f"as feature rows (features of shape {features.shape})"
            )
        ids = np.asarray([str(s) for s in sample_ids], dtype=np.str_)
        labs = np.asarray(["" if x is None else str(x) for x in labels], dtype=np.str_)
        atomic_savez(self.path(index), {"sample_ids": ids, "labels": labs, "features": features})
        return Chunk(index, ids, labs, features)

    def read_chunk(self, index: int) -> Chunk:
        data = load_npz(self.path(index))
        return Chunk(index, data["sample_ids"], data["labels"], data["features"])

    def iter_chunks(self) -> Iterator[Chunk]:
        for index in self.chunk_indices():
            yield self.read_chunk(index)

    def _ids(self, index: int) -> np.ndarray:
        # Reads only the IDs member of the chunk file, not its features.
        return load_npz(self.path(index), keys=("sample_ids",))["sample_ids"]

    def count(self) -> int:
        return sum(len(self._ids(i)) for i in self.chunk_indices())

    def sample_ids(self) -> np.ndarray:
        parts = [self._ids(i) for i in self.chunk_indices()]
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.str_)

    def features(self) -> np.ndarray:
        """All features in one (N, D) float32 array (one copy of the matrix)."""
        parts = [c.features for c in self.iter_chunks()]
        return np.concatenate(parts) if parts else np.zeros((0, 0), dtype=np.float32)

    # -- items that could not be embedded ------------------------------------------------------

    def failures_path(self, index: int) -> Path:
        return self.directory / f"failures-{index:06d}.json"

    def write_failures(self, index: int, failures: Sequence[tuple[str, str]]) -> None:
        atomic_write_bytes(self.failures_path(index), json.dumps([list(f) for f in failures]).encode())

    def failures(self) -> list[tuple[str, str]]:
        """Every (sample_id, reason) skipped so far in this store, in chunk order."""
        if not self.directory.is_dir():
            return []
        chunks = set(self.chunk_indices())
        out: list[tuple[str, str]] = []
        for path in sorted(self.directory.iterdir()):
            m = _FAILURES.match(path.name)
            if m and int(m.group(1)) in chunks:
                out.extend((str(a), str(b)) for a, b in json.loads(path.read_text()))
        return out

    # -- the encoder that made the features ----------------------------------------------------

    def encoder_record(self) -> dict | None:
        path = self.directory / ENCODER_RECORD
        return json.loads(path.read_text()) if path.exists() else None

    def write_encoder_record(self, record: dict) -> None:
        atomic_write_bytes(self.directory / ENCODER_RECORD, json.dumps(record, indent=2).encode())

    # -- cached statistics of chunk prefixes -----------------------------------------------------

    def _statistics_files(self, tag: str) -> list[tuple[int, Path]]:
        # A cache "upto-k" covers chunks 0..k-1; valid only while those chunks are unchanged,
        # which holds because chunks are append-only.
        if not self.directory.is_dir():
            return []
        pattern = re.compile(rf"^stats-{tag}-upto-(\d{{6}})\.npz$")
        return [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := pattern.match(p.name))]

    def cached_statistics(self, tag: str, max_chunks: int) -> tuple[int, dict[str, np.ndarray]] | None:
        """The longest cached prefix covering at most ``max_chunks`` chunks: (chunks, arrays)."""
        usable = [entry for entry in self._statistics_files(tag) if entry[0] <= max_chunks]
        best = max(usable, default=None, key=lambda entry: entry[0])
        return None if best is None else (best[0], load_npz(best[1]))

    def write_statistics(self, tag: str, upto: int, arrays: dict[str, np.ndarray]) -> None:
        """Cache the statistics of chunks 0..upto-1 and remove the shorter prefixes it supersedes
        (each is F x D x D float64: tens to hundreds of MB)."""
        atomic_savez(self.directory / f"stats-{tag}-upto-{upto:06d}.npz", arrays)
        for covered, path in self._statistics_files(tag):
            if covered < upto:
                path.unlink(missing_ok=True)
