"""What every reader yields: one :class:`Sample` per item, never a whole dataset in memory."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from service.errors import InvalidInput

# An item larger than this is refused by the readers before it is read (a zip bomb member, a
# video in an image folder). 64 MiB holds any sane single image.
MAX_ITEM_BYTES = 64 * 1024 * 1024

IMAGE_EXTENSIONS = frozenset(
    {"jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "ppm", "pgm", "pbm", "jfif"}
)


@dataclass(frozen=True)
class Sample:
    """One item of a dataset.

    ``data`` holds the encoded bytes (archives, shards) or ``path`` names a file to read
    (folders, manifests). ``error`` is set when the reader could not get the item's bytes
    (an unreadable archive member, an unsafe name); the pipeline lists it as a failure, so a
    bad item never stops a run.
    """

    sample_id: str
    label: str | None
    data: bytes | None = None
    path: str | None = None
    error: str | None = None


class SampleSource:
    """An iterable of :class:`Sample` that can be iterated more than once."""

    description = "samples"

    def __iter__(self) -> Iterator[Sample]:
        raise NotImplementedError

    def count(self) -> int | None:
        """Number of items the iteration will yield, when it is cheap to know; else None."""
        return None


class ReaderError(InvalidInput):
    """The location cannot be read as a dataset; the message says what to give instead."""


def is_hidden(relative: str) -> bool:
    """Hidden files and OS metadata that are never samples (.DS_Store, __MACOSX/, ._x)."""
    parts = [p for p in relative.replace("\\", "/").split("/") if p not in ("", ".", "..")]
    return any(p.startswith(".") or p == "__MACOSX" or p == "Thumbs.db" for p in parts)


class UnsafeMemberName(InvalidInput):
    """An archive member's name could escape its folder or is ambiguous across systems."""


def member_sample_id(raw: str) -> str:
    """The one rule from an archive member's name to its sample ID (upload check and readers).

    The normalised relative POSIX path (``./a//b.jpg`` -> ``a/b.jpg``). Refused: absolute paths
    and drive letters, ``..`` (zip-slip), NUL, and backslashes (Windows separators or part of a
    name: either reading would be a guess). Nothing is ever extracted, but sample IDs travel to
    clients and must not look like paths outside the set."""
    if "\x00" in raw or "\\" in raw:
        raise UnsafeMemberName(f"unsafe member path {raw[:200]!r}: a backslash or NUL in the name")
    if raw.startswith("/") or (len(raw) > 1 and raw[1] == ":"):
        raise UnsafeMemberName(f"unsafe member path {raw[:200]!r}: absolute")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeMemberName(f"unsafe member path {raw[:200]!r}: contains '..'")
    if not parts:
        raise UnsafeMemberName(f"unsafe member path {raw[:200]!r}: empty")
    return "/".join(parts)


def is_tar(path: Path) -> bool:
    """Whether ``path`` is a tar archive (any compression tarfile reads)."""
    try:
        return tarfile.is_tarfile(path)
    except (OSError, tarfile.TarError, EOFError):
        return False


def label_of(relative: str) -> str | None:
    """ImageFolder convention: the first path component; files at the top level are unlabelled."""
    head, sep, _ = relative.partition("/")
    return head if sep else None
