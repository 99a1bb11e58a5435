"""Thumbnails of a dataset's images, made while embedding, beside the chunks they belong to.

Files in the embedding store's folder (``layout.store_dir``), one per embedding chunk::

    thumbs-000000.npz    sample_ids (str), offsets (int64, n + 1), data (uint8: the JPEGs
                         of the chunk's samples back to back; sample i is data[offsets[i]:offsets[i+1]],
                         empty where no thumbnail could be made)

Written atomically *before* the chunk file, like the failures file: a thumbnail file counts only
once its chunk exists, so an interrupted run rewrites it on resume. Removed with the dataset's
folder. Datasets made from uploaded embeddings have none.

Reading one thumbnail costs one ``pread``: the position of the ``data`` array inside each file
is found once (the archive is stored uncompressed) and kept with the chunk's offsets.
"""

from __future__ import annotations

import io
import os
import re
import struct
import threading
import zipfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from service.storage.files import atomic_savez, load_npz

_THUMBS = re.compile(r"^thumbs-(\d{6})\.npz$")
_CHUNK = "chunk-{:06d}.npz"  # the embedding chunk a thumbnail file belongs to (storage.embeddings)
THUMBNAIL_SIZE = 128  # px, longer side
JPEG_QUALITY = 85
MEDIA_TYPE = "image/jpeg"


def make_thumbnail(image, size: int = THUMBNAIL_SIZE) -> bytes:  # type: ignore[no-untyped-def]
    """A JPEG of a decoded RGB PIL image, its longer side at most ``size`` (never upscaled)."""
    from PIL import Image

    width, height = image.size
    scale = size / max(width, height)
    if scale < 1:
        target = (max(1, round(width * scale)), max(1, round(height * scale)))
        # reducing_gap: a cheap integer box reduction first, then a proper resample.
        image = image.resize(target, Image.Resampling.BILINEAR, reducing_gap=2.0)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def pack(thumbnails: Sequence[bytes | None]) -> tuple[np.ndarray, np.ndarray]:
    """(data uint8, offsets int64 of length n + 1) for a list of JPEGs (None: none made)."""
    parts = [t or b"" for t in thumbnails]
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in parts], out=offsets[1:])
    data = np.frombuffer(b"".join(parts), dtype=np.uint8)
    return data, offsets


def unpack(data: np.ndarray, offsets: np.ndarray) -> list[bytes]:
    raw = data.tobytes()
    return [raw[int(a) : int(b)] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]


@dataclass(frozen=True)
class _ChunkIndex:
    path: Path
    data_start: int  # byte position of data[0] in the file
    offsets: np.ndarray


class NoThumbnails(Exception):
    """The store has no thumbnail files (features were uploaded, not made from images)."""


class ThumbnailStore:
    """The thumbnail files of one embedding store folder."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def path(self, index: int) -> Path:
        return self.directory / f"thumbs-{index:06d}.npz"

    def write(self, index: int, sample_ids: Sequence[str], thumbnails: Sequence[bytes | None]) -> None:
        if len(sample_ids) != len(thumbnails):
            raise ValueError(f"{len(sample_ids)} sample IDs but {len(thumbnails)} thumbnails")
        data, offsets = pack(thumbnails)
        ids = np.asarray([str(s) for s in sample_ids], dtype=np.str_)
        atomic_savez(self.path(index), {"sample_ids": ids, "offsets": offsets, "data": data})

    def indices(self) -> list[int]:
        """Thumbnail files whose chunk exists (a file without its chunk is from a cut-off run)."""
        if not self.directory.is_dir():
            return []
        names = {p.name for p in self.directory.iterdir()}
        found = (int(m.group(1)) for name in names if (m := _THUMBS.match(name)))
        return sorted(i for i in found if _CHUNK.format(i) in names)

    def read(self, index: int) -> tuple[np.ndarray, list[bytes]]:
        """(sample_ids, thumbnails) of one chunk."""
        arrays = load_npz(self.path(index))
        return arrays["sample_ids"], unpack(arrays["data"], arrays["offsets"])

    def get(self, sample_id: str) -> bytes | None:
        """One sample's JPEG; None when the sample has none. Raises :class:`NoThumbnails` when
        the store has no thumbnail file at all."""
        return _lookup(self.directory, tuple(self.indices()), sample_id)


# -- the lookup index: sample ID -> (file, row), kept for a few stores --------------------------

_INDEX_KEPT = 4
_indexes: OrderedDict[tuple[str, tuple[int, ...]], tuple[dict[str, tuple[int, int]], dict[int, _ChunkIndex]]] = OrderedDict()
_lock = threading.Lock()


def _data_start(path: Path) -> int:
    """Where the ``data`` array's bytes begin inside an uncompressed .npz."""
    with zipfile.ZipFile(path) as archive:
        info = archive.getinfo("data.npy")
        if info.compress_type != zipfile.ZIP_STORED:
            raise ValueError(f"{path.name}: data.npy is compressed")
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)
        name_length, extra_length = struct.unpack("<HH", local[26:30])
        fh.seek(info.header_offset + 30 + name_length + extra_length)
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        read_header(fh)  # advances past the header
        return fh.tell()


def _build(directory: Path, indices: tuple[int, ...]) -> tuple[dict[str, tuple[int, int]], dict[int, _ChunkIndex]]:
    rows: dict[str, tuple[int, int]] = {}
    chunks: dict[int, _ChunkIndex] = {}
    for index in indices:
        path = directory / f"thumbs-{index:06d}.npz"
        arrays = load_npz(path, keys=("sample_ids", "offsets"))
        chunks[index] = _ChunkIndex(path, _data_start(path), arrays["offsets"])
        for row, sample_id in enumerate(arrays["sample_ids"].tolist()):
            rows[sample_id] = (index, row)
    return rows, chunks


def _lookup(directory: Path, indices: tuple[int, ...], sample_id: str) -> bytes | None:
    if not indices:
        raise NoThumbnails(str(directory))
    key = (str(directory), indices)
    with _lock:
        entry = _indexes.get(key)
        if entry is not None:
            _indexes.move_to_end(key)
    if entry is None:
        entry = _build(directory, indices)  # outside the lock: other stores stay served
        with _lock:
            _indexes[key] = entry
            while len(_indexes) > _INDEX_KEPT:
                _indexes.popitem(last=False)
    rows, chunks = entry
    where = rows.get(sample_id)
    if where is None:
        return None
    chunk = chunks[where[0]]
    start, stop = int(chunk.offsets[where[1]]), int(chunk.offsets[where[1] + 1])
    if stop == start:
        return None
    fd = os.open(chunk.path, os.O_RDONLY)
    try:
        return os.pread(fd, stop - start, chunk.data_start + start)
    finally:
        os.close(fd)
