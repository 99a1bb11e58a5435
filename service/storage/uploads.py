"""The files of one upload, in its folder under the dataset (``layout.upload_dir``).

    archive          the images as uploaded (zip or tar[.gz]); never extracted
    ids.npy          sample IDs (str); for archives the member path, for embeddings optional
    labels.npy       labels (str) of uploaded embeddings
    embeddings.npy   uploaded features (float, N x D), read memory-mapped

Without ``ids.npy`` the sample ID of an embeddings row is its row index as text (the default
written here once, for the upload check and for the job alike). Every file is moved or written
atomically into a spool folder, and the folder is renamed into place only when complete.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from service.storage.files import atomic_write

ARCHIVE = "archive"
IDS = "ids.npy"
LABELS = "labels.npy"
EMBEDDINGS = "embeddings.npy"


def default_ids(start: int, stop: int) -> np.ndarray:
    """The sample IDs of rows ``start..stop-1`` of embeddings uploaded without IDs."""
    return np.arange(start, stop).astype(np.str_)


def _save(path: Path, array: np.ndarray) -> None:
    atomic_write(path, lambda fh: np.save(fh, array, allow_pickle=False))


class UploadFiles:
    """One upload's folder: write it (while spooled), read it back (in the job)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    # -- writing (the spool folder of a request) ------------------------------------------------

    def put_archive(self, received: Path, ids: np.ndarray) -> None:
        received.rename(self.directory / ARCHIVE)
        _save(self.directory / IDS, np.asarray(ids, dtype=np.str_))

    def put_embeddings(self, received: Path, labels: np.ndarray, ids: np.ndarray | None) -> None:
        """Keep the received matrix; labels and IDs as arrays."""
        _save(self.directory / LABELS, np.asarray(labels, dtype=np.str_))
        if ids is not None:
            _save(self.directory / IDS, np.asarray(ids, dtype=np.str_))
        received.rename(self.directory / EMBEDDINGS)

    @staticmethod
    def ids_or_default(ids: list[str] | None, num_items: int) -> np.ndarray:
        return default_ids(0, num_items) if ids is None else np.asarray(ids, dtype=np.str_)

    # -- reading -------------------------------------------------------------------------------

    @property
    def archive(self) -> Path:
        return self.directory / ARCHIVE

    def has_ids(self) -> bool:
        return (self.directory / IDS).exists()

    def ids(self, num_items: int) -> np.ndarray:
        path = self.directory / IDS
        return np.load(path, allow_pickle=False) if path.exists() else default_ids(0, num_items)

    def labels(self) -> np.ndarray:
        return np.load(self.directory / LABELS, allow_pickle=False)

    def embeddings(self) -> np.ndarray:
        """The uploaded matrix, memory-mapped (rows are read as they are used)."""
        return np.load(self.directory / EMBEDDINGS, mmap_mode="r", allow_pickle=False)

    def embedding_dim(self) -> int:
        return int(self.embeddings().shape[1])
