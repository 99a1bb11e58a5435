"""What every reader yields: one :class:`Sample` per item, never a whole dataset in memory."""

from __future__ import annotations

import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from service.errors import InvalidInput

# An item larger than this is refused by the readers before it is read (a zip bomb member, a
# video in an image folder). 32 MiB holds a 50-megapixel JPEG or a lossless 12-megapixel PNG;
# with the chunk byte bound (pipeline.embedding.MAX_CHUNK_BYTES) it bounds a chunk's memory.
MAX_ITEM_BYTES = 32 * 1024 * 1024

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


# Sample IDs and labels are stored as fixed-width numpy strings (4 bytes per character of the
# longest one, for every row): one 65,000-character name among 100,000 members would mean
# ~26 GB. Limits in characters; a label is also the class folder of an archive member.
MAX_SAMPLE_ID_LENGTH = 512
MAX_LABEL_LENGTH = 256


def text_problem(value: str, what: str, limit: int) -> str | None:
    """Why ``value`` cannot be a sample ID or label (None when it can): longer than ``limit``
    characters, or not encodable as UTF-8 (tar and numpy hand over undecodable bytes as lone
    surrogates, which no response, database or file format can carry)."""
    if len(value) > limit:
        return f"{what} of {len(value)} characters exceeds the limit of {limit} characters"
    if "\x00" in value:
        return f"{what} {value[:100]!r} contains NUL"  # no database text column can hold it
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        shown = value[:100].encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
        return f"{what} {shown!r} is not valid UTF-8: rename it (nothing is repaired silently)"
    return None


def shown_name(raw: str) -> str:
    """A refused member's name as a failure listing shows it: bounded, and always valid UTF-8
    (undecodable bytes appear as escapes such as ``\\udce9``)."""
    return raw[:MAX_SAMPLE_ID_LENGTH].encode("utf-8", "backslashreplace").decode("utf-8")


class UnsafeMemberName(InvalidInput):
    """An archive member's name could escape its folder or is ambiguous across systems."""


def member_sample_id(raw: str) -> str:
    """The one rule from an archive member's name to its sample ID (upload check and readers).

    The normalised relative POSIX path (``./a//b.jpg`` -> ``a/b.jpg``). Refused: absolute paths
    and drive letters, ``..`` (zip-slip), NUL, and backslashes (Windows separators or part of a
    name: either reading would be a guess). Nothing is ever extracted, but sample IDs travel to
    clients and must not look like paths outside the set."""
    # Length (bounded work before splitting; "./" prefixes and doubled slashes leave slack) and
    # UTF-8 first: tar hands undecodable name bytes over as lone surrogates.
    problem = text_problem(raw, "member name", 2 * MAX_SAMPLE_ID_LENGTH)
    if problem is not None:
        raise UnsafeMemberName(problem)
    if "\x00" in raw or "\\" in raw:
        raise UnsafeMemberName(f"unsafe member path {raw[:200]!r}: a backslash or NUL in the name")
    if raw.startswith("/") or (len(raw) > 1 and raw[1] == ":"):
        raise UnsafeMemberName(f"unsafe member path {raw[:200]!r}: absolute")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeMemberName(f"unsafe member path {raw[:200]!r}: contains '..'")
    if not parts:
        raise UnsafeMemberName(f"unsafe member path {raw[:200]!r}: empty")
    name = "/".join(parts)
    if len(name) > MAX_SAMPLE_ID_LENGTH:
        raise UnsafeMemberName(
            f"sample ID of {len(name)} characters exceeds the limit of {MAX_SAMPLE_ID_LENGTH} characters"
        )
    if "/" in name and len(name.partition("/")[0]) > MAX_LABEL_LENGTH:
        raise UnsafeMemberName(
            f"class folder name of {len(name.partition('/')[0])} characters exceeds the limit of "
            f"{MAX_LABEL_LENGTH} characters"
        )
    return name


# A GNU long-name/long-link or pax header is read by tarfile in one read sized by the header
# itself (a 224 KB tar.gz can declare a 200 MiB name): refused above this, before it is read.
# Sample IDs are capped far below it (MAX_SAMPLE_ID_LENGTH).
MAX_TAR_HEADER_BYTES = 64 * 1024
# Extension headers in a row before a member (pax + long name + long link is 3 in real tars);
# each one recurses inside tarfile.
MAX_TAR_HEADER_CHAIN = 8
MAX_TAR_GLOBAL_KEYS = 64  # keys held from global pax headers (they accumulate for the archive)
_TAR_EXTENSIONS = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
                   tarfile.SOLARIS_XHDTYPE)


class TarHeaderRefused(InvalidInput):
    """A tar header over a bound. Not a ``tarfile.TarError``: tarfile would take some of those
    for the end of the archive and stop silently."""


def _bounded_tarinfo(max_headers: int | None) -> type[tarfile.TarInfo]:
    """A TarInfo class that refuses oversized extension headers, sparse members, long header
    chains and (with ``max_headers``) more headers than that, each before tarfile reads it."""
    state = {"headers": 0, "chain": 0}

    class BoundedTarInfo(tarfile.TarInfo):
        def _proc_member(self, archive):  # type: ignore[no-untyped-def]  # tarfile's hook
            state["headers"] += 1
            if max_headers is not None and state["headers"] > max_headers:
                raise TarHeaderRefused(
                    f"archive has more than {max_headers} entries (limit; every header counts, "
                    "directories and extension headers included)"
                )
            if self.type == tarfile.GNUTYPE_SPARSE:
                raise TarHeaderRefused(f"archive member {self.name[:200]!r} is a sparse file (not an image)")
            if self.type not in _TAR_EXTENSIONS:
                state["chain"] = 0
                return super()._proc_member(archive)
            if self.size > MAX_TAR_HEADER_BYTES:
                raise TarHeaderRefused(
                    f"a tar extension header declares {self.size} bytes (limit {MAX_TAR_HEADER_BYTES} bytes)"
                )
            state["chain"] += 1
            if state["chain"] > MAX_TAR_HEADER_CHAIN:
                raise TarHeaderRefused(f"more than {MAX_TAR_HEADER_CHAIN} tar extension headers in a row")
            if self.type == tarfile.XGLTYPE and len(archive.pax_headers) > MAX_TAR_GLOBAL_KEYS:
                raise TarHeaderRefused(f"global pax headers hold more than {MAX_TAR_GLOBAL_KEYS} keys")
            return super()._proc_member(archive)

        def _sparse_refused(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            raise TarHeaderRefused(f"archive member {self.name[:200]!r} is a sparse file (not an image)")

        # pax GNU sparse formats 0.0, 0.1 and 1.0 (1.0 reads a map of any length from the data)
        _proc_gnusparse_00 = _proc_gnusparse_01 = _proc_gnusparse_10 = _sparse_refused

    return BoundedTarInfo


def iter_tar(
    path: Path, *, max_headers: int | None = None, stream: bool = True
) -> Iterator[tuple[tarfile.TarFile, tarfile.TarInfo]]:
    """(archive, member) for every header of a tar, in constant memory: headers are bounded
    (above) and the TarInfo list tarfile keeps of every member is dropped as it goes. The
    caller may ``archive.extractfile(member)`` before asking for the next one. ``stream``:
    one forward pass (``r|*``); else random access (``r:*``, seeks over member data).

    Raises ``TarHeaderRefused`` and tarfile's errors."""
    with tarfile.open(path, mode="r|*" if stream else "r:*", tarinfo=_bounded_tarinfo(max_headers)) as archive:
        while True:
            member = archive.next()
            if member is None:
                return
            archive.members.clear()
            yield archive, member


def is_tar(path: Path) -> bool:
    """Whether ``path`` is a tar archive (any compression tarfile reads)."""
    # tarfile.is_tarfile reads the first header unbounded (a GNU long-name bomb); this opens it
    # with the bounded headers instead.
    try:
        with tarfile.open(path, mode="r:*", tarinfo=_bounded_tarinfo(None)):
            return True
    except TarHeaderRefused:
        return True  # a tar: the scan refuses it with the reason
    except (OSError, tarfile.TarError, EOFError):
        return False


def label_of(relative: str) -> str | None:
    """ImageFolder convention: the first path component; files at the top level are unlabelled."""
    head, sep, _ = relative.partition("/")
    return head if sep else None
