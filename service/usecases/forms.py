"""A request body received into a spool folder under the data dir (``layout.spool_dir``)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Form:
    directory: Path  # the spool folder; its files move into the dataset when accepted
    files: dict[str, Path] = field(default_factory=dict)  # field name -> received file
    fields: dict[str, str] = field(default_factory=dict)  # short text fields

    def drop(self, name: str) -> None:
        """Remove a received file that was read, not kept."""
        if name in self.files:
            self.files.pop(name).unlink(missing_ok=True)

    def discard(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
