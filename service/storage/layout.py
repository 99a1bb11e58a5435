"""Where everything lives under the data directory; the one place its folder names are spelled.

    <data dir>/
      difficulty.db                     the embedded default database (SQLite)
      tmp/upload-<id>/                  uploads being received (same file system: atomic renames)
      datasets/<dataset id>/
        uploads/<upload id>/            one upload's files          (storage.uploads.UploadFiles)
        embeddings/                     the dataset's features      (storage.embeddings.EmbeddingStore)
        fits/<fit id>/                  one fit's model and scores  (storage.fits.FitFiles)
        scorings/<job id>/              one archive-scoring job     (storage.scorings.ScoringFiles)

IDs are the service's own (``database.new_id``); anything else is refused before it becomes a
path, so no ID can name a folder outside its parent (and no path has to be resolved per request).
"""

from __future__ import annotations

import re
from pathlib import Path

from service.storage.files import UnsafePathError, safe_join

DATABASE_FILE = "difficulty.db"
SPOOL_PREFIX = "upload-"
_ID = re.compile(r"^[0-9A-Za-z_-]{1,64}$")


def _checked(identifier: str) -> str:
    if not _ID.match(identifier):
        raise UnsafePathError(f"{identifier[:80]!r} is not an ID of this service")
    return identifier


def database_path(data_dir: Path) -> Path:
    return data_dir / DATABASE_FILE


def tmp_dir(data_dir: Path) -> Path:
    return data_dir / "tmp"


def spool_dir(data_dir: Path, upload_id: str) -> Path:
    """The folder an incoming upload is received into."""
    return tmp_dir(data_dir) / f"{SPOOL_PREFIX}{_checked(upload_id)}"


def spool_dirs(data_dir: Path) -> list[Path]:
    folder = tmp_dir(data_dir)
    return sorted(folder.glob(f"{SPOOL_PREFIX}*")) if folder.is_dir() else []


def datasets_dir(data_dir: Path) -> Path:
    return data_dir / "datasets"


def dataset_dir(data_dir: Path, dataset_id: str) -> Path:
    return datasets_dir(data_dir) / _checked(dataset_id)


def _id_folders(folder: Path) -> list[str]:
    # Folder names that are IDs of this service; anything else there is not ours to judge.
    if not folder.is_dir():
        return []
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.is_symlink() and _ID.match(p.name))


def dataset_ids(data_dir: Path) -> list[str]:
    """The dataset folders on disk (the start-up sweep compares them with the database)."""
    return _id_folders(datasets_dir(data_dir))


def upload_folders(data_dir: Path, dataset_id: str) -> list[str]:
    """A dataset's upload folders on disk, as recorded with their uploads (``uploads/<id>``)."""
    return [new_upload_folder(i) for i in _id_folders(dataset_dir(data_dir, dataset_id) / "uploads")]


def fit_ids(data_dir: Path, dataset_id: str) -> list[str]:
    """A dataset's fit folders on disk."""
    return _id_folders(dataset_dir(data_dir, dataset_id) / "fits")


def new_upload_folder(upload_id: str) -> str:
    """An upload's folder relative to its dataset's (recorded with the upload)."""
    return f"uploads/{_checked(upload_id)}"


def upload_dir(data_dir: Path, dataset_id: str, folder: str) -> Path:
    return safe_join(dataset_dir(data_dir, dataset_id), folder)


def store_dir(data_dir: Path, dataset_id: str) -> Path:
    return dataset_dir(data_dir, dataset_id) / "embeddings"


def fit_dir(data_dir: Path, dataset_id: str, fit_id: str) -> Path:
    return dataset_dir(data_dir, dataset_id) / "fits" / _checked(fit_id)


def scoring_dir(data_dir: Path, dataset_id: str, job_id: str) -> Path:
    """One archive-scoring job's folder: its archive and embeddings while it runs, its result."""
    return dataset_dir(data_dir, dataset_id) / "scorings" / _checked(job_id)
