"""An ImageFolder directory: ``<root>/<class>/<image>``, walked lazily in sorted order."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

from service.ingest.sample import MAX_ITEM_BYTES, Sample, SampleSource, is_hidden, label_of


class FolderSource(SampleSource):
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.description = f"folder {self.root}"

    def _walk(self) -> Iterator[tuple[str, os.stat_result]]:
        # os.walk with sorted names gives a stable order (sample order = chunk contents);
        # followlinks=False and lstat below keep symlinks (and what they point at) out.
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=False):
            dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
            for name in sorted(filenames):
                full = os.path.join(dirpath, name)
                relative = Path(full).relative_to(self.root).as_posix()
                if is_hidden(relative):
                    continue
                try:
                    st = os.lstat(full)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    yield relative, st

    def __iter__(self) -> Iterator[Sample]:
        for relative, st in self._walk():
            label = label_of(relative)
            if st.st_size > MAX_ITEM_BYTES:
                yield Sample(relative, label, error=f"file too large ({st.st_size} bytes)")
            else:
                yield Sample(relative, label, path=str(self.root / relative))

    def count(self) -> int | None:
        return sum(1 for _ in self._walk())
