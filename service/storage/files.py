"""Files under the data directory: atomic writes and paths that cannot escape their root."""

from __future__ import annotations

import base64
import os
import tempfile
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa


class UnsafePathError(ValueError):
    """A path would resolve outside the directory it must stay in."""


def safe_join(root: Path, relative: str | os.PathLike[str]) -> Path:
    """``root / relative``, refusing absolute paths, ``..`` and anything resolving outside."""
    rel = Path(relative)
    if rel.is_absolute() or ".." in rel.parts:
        raise UnsafePathError(f"path {str(relative)!r} is absolute or contains '..'")
    root_resolved = root.resolve()
    target = (root_resolved / rel).resolve()
    if target != root_resolved and root_resolved not in target.parents:
        raise UnsafePathError(f"path {str(relative)!r} resolves outside {root}")
    return target


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> Path:
    """Write through ``write(fileobj)`` to a temporary file beside ``path``, fsync, rename.

    Readers see either the old file or the complete new one, never a partial write."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)  # the rename itself survives a power loss only once its folder is synced
    return path


def fsync_dir(directory: Path) -> None:
    """Make the entries of ``directory`` (a rename into it) durable."""
    fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """fsync every file directly in ``directory`` and the folder itself (a spooled upload,
    before it is renamed into place and recorded)."""
    for entry in directory.iterdir():
        if entry.is_file() and not entry.is_symlink():
            with open(entry, "rb") as fh:
                os.fsync(fh.fileno())
    fsync_dir(directory)


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    return atomic_write(path, lambda fh: fh.write(data))


def atomic_savez(path: Path, arrays: dict[str, np.ndarray]) -> Path:
    """``np.savez`` (uncompressed, no pickles) written atomically."""

    return atomic_write(path, lambda fh: np.savez(fh, **arrays))  # streamed: no copy in memory


def load_npz(path: Path, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The arrays of an .npz (only ``keys`` when given: the others are not read)."""
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in (data.files if keys is None else keys)}


@lru_cache(maxsize=32)
def mapped_arrow_file(path: str) -> pa.Table:
    """An Arrow IPC file, memory-mapped and zero-copy (cached per path: the score tables and
    scoring results are written once and never change), so many requests share the page cache
    rather than the heap."""
    return pa.ipc.open_file(pa.memory_map(path, "r")).read_all()


def encode_token(raw: bytes) -> str:
    """Unpadded URL-safe base64: the alphabet of every page cursor (``schemas.CURSOR_PATTERN``)."""
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str) -> bytes:
    """The inverse of :func:`encode_token` (raises ``ValueError`` for a malformed token)."""
    return base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
