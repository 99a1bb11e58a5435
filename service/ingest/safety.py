"""Validate an uploaded archive before anything reads it: refuse what could escape the dataset's
folder or exhaust the machine.

Refused (``ArchiveError``, a 4xx for the API): not a zip/tar, absolute member paths, ``..``
components, backslashes or NUL in names, symlinks and hardlinks, device files and FIFOs,
duplicate names, too many members, too many uncompressed bytes in total (zip/tar bombs), and
archives without any ``<class>/<file>`` member. Nothing is extracted here.
"""

from __future__ import annotations

import stat
import tarfile
import zipfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from service.errors import InvalidInput
from service.ingest.sample import (
    TarHeaderRefused,
    UnsafeMemberName,
    is_hidden,
    is_tar,
    iter_tar,
    member_sample_id,
)

# A zip member that claims to expand more than this ratio is a bomb, whatever the total.
MAX_COMPRESSION_RATIO = 1000
_RATIO_MIN_BYTES = 1 << 20
# Average central-directory bytes per entry a zip may use (46-byte record + a name of at most
# MAX_SAMPLE_ID_LENGTH characters in UTF-8 + ordinary extra fields).
MAX_ZIP_ENTRY_BYTES = 4096

class ArchiveError(InvalidInput):
    """The archive is refused; the message says which member and why."""

    def __str__(self) -> str:
        return f"archive refused: {super().__str__()}"


@dataclass(frozen=True)
class ArchiveMember:
    name: str  # normalised path inside the archive = the sample ID
    size: int  # uncompressed bytes
    label: str  # first path component


def normalise_member_name(raw: str) -> str | None:
    """The member's sample ID (the readers' rule, ``member_sample_id``), or None for entries that
    are not samples (hidden or OS metadata files, as the readers skip them). Unsafe names refuse
    the whole upload."""
    if raw.strip("/.") == "":
        return None  # the archive's root entry ("./")
    try:
        name = member_sample_id(raw)
    except UnsafeMemberName as exc:
        raise ArchiveError(str(exc)) from None
    return None if is_hidden(name) else name


def inspect_archive(
    path: Path, *, max_members: int = 2_000_000, max_total_bytes: int = 64 * 1024**3
) -> list[ArchiveMember]:
    """The sample members of a zip or tar(.gz/.bz2/.xz) archive, after refusing unsafe ones."""
    path = Path(path)
    if zipfile.is_zipfile(path):
        raw = _zip_members(path, max_members)
    elif is_tar(path):
        raw = _tar_members(path, max_members, max_total_bytes)
    else:
        raise ArchiveError("the upload is not a zip or tar(.gz) archive")
    members: list[ArchiveMember] = []
    total = 0
    for name, size in raw:
        total += size
        if len(members) >= max_members:
            raise ArchiveError(f"archive has more than {max_members} members (limit DIFFICULTY_MAX_ARCHIVE_MEMBERS)")
        if total > max_total_bytes:
            raise ArchiveError(
                f"archive expands to more than {max_total_bytes} bytes (limit); split it into smaller uploads"
            )
        sample_id = normalise_member_name(name)
        if sample_id is None:
            continue
        parts = sample_id.split("/")
        if len(parts) < 2:
            raise ArchiveError(
                f"archive member {name!r} is not inside a class folder: use <class>/<image> (ImageFolder layout)"
            )
        members.append(ArchiveMember(sample_id, size, parts[0]))
    if not members:
        raise ArchiveError("archive holds no <class>/<image> files")
    duplicates = [n for n, c in Counter(m.name for m in members).items() if c > 1]
    if duplicates:
        raise ArchiveError(f"archive has {len(duplicates)} duplicate member names (first: {duplicates[0]!r})")
    return members


def _zip_directory(path: Path, max_members: int) -> None:
    """Refuse a zip whose end-of-central-directory record declares more entries than allowed, or
    a central directory larger than that many entries need, before ``zipfile`` reads and parses
    the directory (it reads it whole, then builds one ZipInfo per entry whatever the count says).
    """
    with open(path, "rb") as fh:
        record = zipfile._EndRecData(fh)  # the record zipfile itself reads (zip64 resolved)
    if record is None:
        raise ArchiveError("the zip archive is corrupt: no end-of-central-directory record")
    entries, size = record[zipfile._ECD_ENTRIES_TOTAL], record[zipfile._ECD_SIZE]
    if entries > max_members:
        raise ArchiveError(
            f"archive has {entries} entries, more than the limit of {max_members} "
            "(DIFFICULTY_MAX_ARCHIVE_MEMBERS; directories count)"
        )
    if size > max(entries, 1) * MAX_ZIP_ENTRY_BYTES:
        raise ArchiveError(
            f"the zip central directory is {size} bytes for {entries} entries "
            f"(more than {MAX_ZIP_ENTRY_BYTES} bytes per entry): corrupt or hostile"
        )


def _zip_members(path: Path, max_members: int) -> list[tuple[str, int]]:
    out = []
    try:
        _zip_directory(path, max_members)
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
            if len(infos) > max_members:  # the record's count can lie; the list cannot
                raise ArchiveError(
                    f"archive has more than {max_members} entries (limit DIFFICULTY_MAX_ARCHIVE_MEMBERS; "
                    "directories count)"
                )
            for info in infos:
                mode = info.external_attr >> 16
                kind = stat.S_IFMT(mode)
                if kind == stat.S_IFLNK:
                    raise ArchiveError(f"archive member {info.filename!r} is a symlink")
                if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                    raise ArchiveError(f"archive member {info.filename!r} is a device file, FIFO or socket")
                normalise_member_name(info.filename)  # refuses escaping names, dirs included
                if info.is_dir():
                    continue
                if (
                    info.file_size > _RATIO_MIN_BYTES
                    and info.file_size > MAX_COMPRESSION_RATIO * max(info.compress_size, 1)
                ):
                    raise ArchiveError(
                        f"archive member {info.filename!r} expands more than {MAX_COMPRESSION_RATIO}x (zip bomb)"
                    )
                out.append((info.filename, info.file_size))
    except zipfile.BadZipFile as exc:
        raise ArchiveError(f"the zip archive is corrupt: {exc}") from None
    return out


def _tar_members(path: Path, max_members: int, max_total_bytes: int) -> list[tuple[str, int]]:
    out = []
    total = 0
    try:
        # One forward pass, constant memory: every header counts against the member limit
        # (directories and extension headers too) and no header is read above its bound.
        for _, member in iter_tar(path, max_headers=max_members):
            if member.issym() or member.islnk():
                raise ArchiveError(f"archive member {member.name[:200]!r} is a symlink or hardlink")
            if member.ischr() or member.isblk() or member.isfifo() or member.isdev():
                raise ArchiveError(f"archive member {member.name[:200]!r} is a device file or FIFO")
            normalise_member_name(member.name)
            if member.isdir():
                continue
            if not member.isfile():
                raise ArchiveError(f"archive member {member.name[:200]!r} is not a regular file")
            total += member.size
            # Stop early on bombs instead of decompressing the whole stream first.
            if total > max_total_bytes:
                raise ArchiveError(
                    f"archive expands to more than {max_total_bytes} bytes (limit); split it into smaller uploads"
                )
            out.append((member.name, member.size))
    except TarHeaderRefused as exc:
        raise ArchiveError(str(exc)) from None
    except (tarfile.TarError, EOFError, OSError, zlib_error()) as exc:
        raise ArchiveError(f"the tar archive is corrupt or truncated: {exc}") from None
    return out


def zlib_error() -> type[Exception]:
    import zlib

    return zlib.error
