"""The start-up sweep: what a crash left in the data dir without a database row.

    tmp/upload-<id>/               a request cut off while its body was spooled
    datasets/<id>/                 a dataset deleted (rows committed) before its folder was removed
    datasets/<id>/uploads/<id>/    an upload renamed into place, the process gone before its commit
    datasets/<id>/fits/<id>/       a fit published, the job gone before its commit; or a retired
                                   fit whose rows were deleted before its folder was

A folder is removed only when nothing in it changed for the grace period: an upload or a fit
between its rename and its commit (in this process or another one on the same data dir) has
fresh files and is never taken. A database that knows none of the dataset folders on disk is
taken for a misconfiguration (another database than this data dir's), not for orphans: whole
dataset folders are then left alone.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from service.storage import layout
from service.storage.database import Dataset, Fit, Upload

log = logging.getLogger(__name__)

# A spool folder may belong to an upload still streaming in another process.
STALE_SPOOL_SECONDS = 24 * 3600


@dataclass
class SweepReport:
    spools: list[Path] = field(default_factory=list)
    datasets: list[Path] = field(default_factory=list)
    uploads: list[Path] = field(default_factory=list)
    fits: list[Path] = field(default_factory=list)

    @property
    def removed(self) -> list[Path]:
        return [*self.spools, *self.datasets, *self.uploads, *self.fits]


def newest_change(path: Path) -> float:
    """The latest mtime of ``path`` and everything below it (files vanishing meanwhile are
    skipped): the time the folder was last written."""
    newest = path.lstat().st_mtime
    for root, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            with contextlib.suppress(OSError):  # removed meanwhile
                newest = max(newest, os.lstat(os.path.join(root, name)).st_mtime)
    return newest


def _idle_for(path: Path, seconds: float, now: float) -> bool:
    try:
        return now - newest_change(path) > seconds
    except OSError:  # gone meanwhile
        return False


def _remove(path: Path, into: list[Path]) -> None:
    shutil.rmtree(path, ignore_errors=True)
    into.append(path)


def sweep(data_dir: Path, db: sessionmaker, *, grace_seconds: float, now: float | None = None) -> SweepReport:
    """Remove stale spools (after STALE_SPOOL_SECONDS) and dataset, upload and fit folders
    without a row that were idle for ``grace_seconds``."""
    now = time.time() if now is None else now
    report = SweepReport()
    for path in layout.spool_dirs(data_dir):
        if _idle_for(path, STALE_SPOOL_SECONDS, now):
            _remove(path, report.spools)
    on_disk = layout.dataset_ids(data_dir)
    if not on_disk:
        return report
    with db() as session:
        known: set[str] = set()
        for start in range(0, len(on_disk), 500):  # bounded IN lists
            batch = on_disk[start:start + 500]
            known.update(session.scalars(select(Dataset.id).where(Dataset.id.in_(batch))))
        for dataset_id in on_disk:
            folder = layout.dataset_dir(data_dir, dataset_id)
            if dataset_id not in known:
                if known and _idle_for(folder, grace_seconds, now):
                    _remove(folder, report.datasets)
                continue
            uploads = set(session.scalars(select(Upload.path).where(Upload.dataset_id == dataset_id)))
            for name in layout.upload_folders(data_dir, dataset_id):
                path = layout.upload_dir(data_dir, dataset_id, name)
                if name not in uploads and _idle_for(path, grace_seconds, now):
                    _remove(path, report.uploads)
            fits = set(session.scalars(select(Fit.id).where(Fit.dataset_id == dataset_id)))
            for fit_id in layout.fit_ids(data_dir, dataset_id):
                path = layout.fit_dir(data_dir, dataset_id, fit_id)
                if fit_id not in fits and _idle_for(path, grace_seconds, now):
                    _remove(path, report.fits)
    if not known:
        log.warning("the database knows none of the %d dataset folders in %s: is it this data dir's "
                    "database? Dataset folders were not swept", len(on_disk), data_dir)
    for path in report.removed:
        log.info("start-up sweep: removed %s (no database row, idle)", path)
    return report
