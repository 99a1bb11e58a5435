"""Where a dataset's files live under the data dir (one folder per dataset)."""

from __future__ import annotations

from pathlib import Path

from service.storage.files import safe_join


def dataset_dir(data_dir: Path, dataset_id: str) -> Path:
    return safe_join(data_dir / "datasets", dataset_id)


def store_dir(data_dir: Path, dataset_id: str) -> Path:
    return dataset_dir(data_dir, dataset_id) / "embeddings"


def fit_dir(data_dir: Path, dataset_id: str, fit_id: str) -> Path:
    return dataset_dir(data_dir, dataset_id) / "fits" / fit_id
