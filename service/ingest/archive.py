"""ImageFolder layout inside a zip or tar(.gz) archive, read member by member (never extracted).

A tar is read as a stream (``r|*``): one pass, constant memory, gzip or not. A zip needs its
central directory, so it is opened by path, but members are still read one at a time.
"""

from __future__ import annotations

import stat
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from service.ingest.sample import (
    MAX_ITEM_BYTES,
    Sample,
    SampleSource,
    TarHeaderRefused,
    UnsafeMemberName,
    is_hidden,
    iter_tar,
    label_of,
    member_sample_id,
    shown_name,
)


class ZipSource(SampleSource):
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.description = f"zip archive {self.path}"

    def _members(self, archive: zipfile.ZipFile) -> Iterator[zipfile.ZipInfo]:
        for info in archive.infolist():
            if info.is_dir() or is_hidden(info.filename):
                continue
            mode = info.external_attr >> 16
            # Unix file-type bits, when present, say whether a member is a symlink or a device.
            if stat.S_IFMT(mode) and not stat.S_ISREG(mode):
                continue
            yield info

    def __iter__(self) -> Iterator[Sample]:
        with zipfile.ZipFile(self.path) as archive:
            for info in self._members(archive):
                yield _zip_sample(archive, info)

    def count(self) -> int | None:
        with zipfile.ZipFile(self.path) as archive:
            return sum(1 for _ in self._members(archive))


def _zip_sample(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> Sample:
    try:
        name = member_sample_id(info.filename)
    except UnsafeMemberName as exc:
        return Sample(shown_name(info.filename), None, error=str(exc))
    label = label_of(name)
    if info.file_size > MAX_ITEM_BYTES:
        return Sample(name, label, error=f"member too large ({info.file_size} bytes)")
    try:
        with archive.open(info) as fh:
            # Bounded read: the declared size in a hostile zip can lie.
            data = fh.read(MAX_ITEM_BYTES + 1)
    except (zipfile.BadZipFile, RuntimeError, OSError, EOFError, NotImplementedError) as exc:
        return Sample(name, label, error=f"unreadable archive member: {exc}")
    if len(data) > MAX_ITEM_BYTES:
        return Sample(name, label, error="member too large")
    return Sample(name, label, data=data)


def iter_tar_members(path: Path) -> Iterator[tuple[str | None, str, bytes | None, str | None]]:
    """(clean name or None, raw name, bytes or None, error or None) for each regular member.

    A truncated or corrupt archive ends the iteration with one error entry instead of raising,
    so the run finishes and lists what went wrong."""
    seen = 0
    try:
        # The upload check's bounds (sample.iter_tar): no oversized header is read, memory flat.
        for archive, member in iter_tar(path):
            if not member.isreg() or is_hidden(member.name):
                continue
            seen += 1
            try:
                name = member_sample_id(member.name)
            except UnsafeMemberName as exc:
                yield None, shown_name(member.name), None, str(exc)
                continue
            if member.size > MAX_ITEM_BYTES:
                yield name, member.name, None, f"member too large ({member.size} bytes)"
                continue
            fh = archive.extractfile(member)
            data = fh.read() if fh is not None else b""
            if len(data) != member.size:
                yield name, member.name, None, "archive member truncated"
                continue
            yield name, member.name, data, None
    except (tarfile.TarError, TarHeaderRefused, EOFError, OSError, ValueError) as exc:
        yield None, f"{Path(path).name}#after-{seen}", None, f"archive unreadable after {seen} members: {exc}"


class TarSource(SampleSource):
    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.description = f"tar archive {self.path}"

    def __iter__(self) -> Iterator[Sample]:
        for name, raw, data, error in iter_tar_members(self.path):
            if name is None:
                yield Sample(raw, None, error=error)
            elif error is not None:
                yield Sample(name, label_of(name), error=error)
            else:
                yield Sample(name, label_of(name), data=data)

    def count(self) -> int | None:
        return tar_member_count(self.path)


def tar_member_count(path: Path) -> int | None:
    # Headers only: an uncompressed tar seeks over member data; a gzip tar has to be
    # decompressed, which is still far faster than decoding and embedding the images.
    try:
        return sum(1 for _, m in iter_tar(path, stream=False) if m.isreg() and not is_hidden(m.name))
    except (tarfile.TarError, TarHeaderRefused, EOFError, OSError):
        return None
