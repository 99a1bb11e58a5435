"""WebDataset shards: tars whose members ``<key>.<ext>`` group into samples, e.g.
``000123.jpg`` + ``000123.cls``. The label is the text of ``.cls``; the sample ID is the key."""

from __future__ import annotations

import glob
import re
from collections.abc import Iterator
from pathlib import Path

from service.ingest.archive import iter_tar_members
from service.ingest.sample import IMAGE_EXTENSIONS, ReaderError, Sample, SampleSource


def split_key(name: str) -> tuple[str, str]:
    """WebDataset convention: the key ends at the first dot of the file name."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower() if dot else ""


class WebDatasetSource(SampleSource):
    def __init__(self, shards: list[Path]) -> None:
        if not shards:
            raise ReaderError("no WebDataset shards found")
        self.shards = shards
        self.description = f"{len(shards)} WebDataset shard(s)"

    def __iter__(self) -> Iterator[Sample]:
        for shard in self.shards:
            yield from _shard_samples(shard)

    def count(self) -> int | None:
        return None  # would need a pass over every shard; progress shows a rate without it


def _shard_samples(shard: Path) -> Iterator[Sample]:
    key: str | None = None
    parts: dict[str, bytes] = {}
    errors: list[str] = []
    for name, raw, data, error in iter_tar_members(shard):
        if name is None:  # an unsafe or unreadable name: no key to group it under
            yield Sample(raw, None, error=error)
            continue
        k, ext = split_key(name)
        if k != key:
            if key is not None:
                yield _make_sample(key, parts, errors)
            key, parts, errors = k, {}, []
        if error is not None:
            errors.append(f"{name}: {error}")
        else:
            parts[ext] = data or b""
    if key is not None:
        yield _make_sample(key, parts, errors)


def _make_sample(key: str, parts: dict[str, bytes], errors: list[str]) -> Sample:
    """One sample per key; a bad member fails its key once, under the key, label kept."""
    label = None
    if "cls" in parts:
        label = parts["cls"].decode("utf-8", errors="replace").strip() or None
    if errors:
        return Sample(key, label, error="; ".join(errors))
    image_ext = next((e for e in parts if e in IMAGE_EXTENSIONS), None)
    if image_ext is None:
        return Sample(key, label, error=f"no image member (found {sorted(parts) or 'nothing'})")
    return Sample(key, label, data=parts[image_ext])


_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_shard_pattern(pattern: str) -> list[Path]:
    """``shards-{000..009}.tar`` (WebDataset brace ranges) and shell globs, sorted."""
    m = _BRACE.search(pattern)
    if m:
        lo, hi, width = int(m.group(1)), int(m.group(2)), len(m.group(1))
        out: list[Path] = []
        for i in range(lo, hi + 1):
            out.extend(expand_shard_pattern(pattern[: m.start()] + f"{i:0{width}d}" + pattern[m.end() :]))
        return out
    if any(c in pattern for c in "*?["):
        return [Path(p) for p in sorted(glob.glob(pattern))]
    return [Path(pattern)] if Path(pattern).is_file() else []
