"""What every reader yields: one :class:`Sample` per item, never a whole dataset in memory."""

from __future__ import annotations

import posixpath
from collections.abc import Iterator
from dataclasses import dataclass

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


def clean_member_name(name: str) -> str | None:
    """Normalised relative POSIX name of an archive member, or None if it is unsafe.

    Unsafe: absolute, drive letters, or climbing out with ``..`` (zip-slip). The readers never
    extract, but sample IDs travel to clients and must not look like paths outside the set."""
    name = name.replace("\\", "/")
    if name.startswith("/") or (len(name) > 1 and name[1] == ":"):
        return None
    normalised = posixpath.normpath(name)
    if normalised in (".", "") or normalised.startswith("../") or normalised == "..":
        return None
    return normalised


def label_of(relative: str) -> str | None:
    """ImageFolder convention: the first path component; files at the top level are unlabelled."""
    head, sep, _ = relative.partition("/")
    return head if sep else None
