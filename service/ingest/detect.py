"""``open_source(location)``: pick the reader for a folder, archive, manifest or shards."""

from __future__ import annotations

import tarfile
import zipfile
from pathlib import Path

from service.ingest.archive import TarSource, ZipSource
from service.ingest.folder import FolderSource
from service.ingest.manifest import MANIFEST_SUFFIXES, ManifestSource
from service.ingest.sample import (
    ReaderError,
    SampleSource,
    TarHeaderRefused,
    is_hidden,
    is_tar,
    iter_tar,
)
from service.ingest.webdataset import WebDatasetSource, expand_shard_pattern

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
_PEEK_MEMBERS = 32


def open_source(location: str | Path) -> SampleSource:
    path = Path(location)
    if not path.exists():
        # Only a location that is not a real path is read as a shard pattern: "imgs[v2]" may
        # simply be a folder's name.
        if any(c in str(location) for c in "*?[{"):
            return WebDatasetSource(expand_shard_pattern(str(location)))
        raise ReaderError(f"{path} does not exist")
    if path.is_dir():
        shards = _shard_files(path)
        return WebDatasetSource(shards) if shards else FolderSource(path)
    name = path.name.lower()
    if name.endswith(MANIFEST_SUFFIXES):
        return ManifestSource(path)
    if name.endswith(".zip") or (not name.endswith(TAR_SUFFIXES) and zipfile.is_zipfile(path)):
        return ZipSource(path)
    if name.endswith(TAR_SUFFIXES) or is_tar(path):
        return WebDatasetSource([path]) if looks_like_webdataset(path) else TarSource(path)
    raise ReaderError(
        f"cannot read {path.name!r} as a dataset: give an ImageFolder directory, a .zip/.tar/"
        ".tar.gz archive, a manifest (.csv/.jsonl/.parquet with path,label[,id]) or "
        "WebDataset shards"
    )


def looks_like_webdataset(path: Path) -> bool:
    """A tar is a WebDataset shard when its first members carry ``.cls`` labels; an
    ImageFolder tar has ``<class>/<image>`` members and no such files."""
    try:
        for i, (_, member) in enumerate(iter_tar(path)):
            if i >= _PEEK_MEMBERS:
                break
            if member.isreg() and member.name.lower().endswith(".cls"):
                return True
    except (tarfile.TarError, TarHeaderRefused, EOFError, OSError):
        return False
    return False


def _shard_files(directory: Path) -> list[Path]:
    # A directory is a set of shards when it holds tar files and no class subdirectories.
    entries = [p for p in directory.iterdir() if not is_hidden(p.name)]
    if any(p.is_dir() for p in entries):
        return []
    tars = sorted(p for p in entries if p.is_file() and p.name.lower().endswith(TAR_SUFFIXES))
    return tars if tars and all(looks_like_webdataset(t) for t in tars[:1]) else []



