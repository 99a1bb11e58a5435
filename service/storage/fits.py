"""The files of one fit, in its folder ``layout.fit_dir(data_dir, dataset_id, fit_id)``.

    model.npz        the fitted Gaussians (``GaussianModel.to_arrays``)
    meta.json        {"num_chunks": the embedding-store chunks the fit covered}
    scores.arrow, by_label.arrow, labels.json, scores.parquet
                     the score table and its sorted copies (written and paged by storage.scores)

A fit folder is written completely before the database names it as the dataset's current fit,
so readers never see a partial one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa

from service.storage import layout
from service.storage.files import atomic_savez, atomic_write_bytes, load_npz
from service.storage.scores import write_score_files

MODEL = "model.npz"
META = "meta.json"


class FitFiles:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    @classmethod
    def of(cls, data_dir: Path, dataset_id: str, fit_id: str) -> FitFiles:
        return cls(layout.fit_dir(data_dir, dataset_id, fit_id))

    def write(self, model_arrays: dict[str, np.ndarray], scores: pa.Table, *, num_chunks: int) -> None:
        atomic_savez(self.directory / MODEL, model_arrays)
        write_score_files(self.directory, scores)
        atomic_write_bytes(self.directory / META, json.dumps({"num_chunks": num_chunks}).encode())

    def model_arrays(self) -> dict[str, np.ndarray]:
        return load_npz(self.directory / MODEL)

    def num_chunks(self) -> int:
        return int(json.loads((self.directory / META).read_text())["num_chunks"])

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)
