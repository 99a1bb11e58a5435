"""The files of one fit, in its folder ``layout.fit_dir(data_dir, dataset_id, fit_id)``.

    model.npz        the fitted Gaussians (``GaussianModel.to_arrays``)
    meta.json        {"num_chunks": the embedding-store chunks the fit covered}
    scores.arrow, by_label.arrow, labels.json, scores.parquet
                     the score table and its sorted copies (written and paged by storage.scores)
    map.arrow        the 2-D map: float32 columns x, y, row-aligned with scores.arrow (optional:
                     fits published before the map existed have none)

A fit folder is written completely before the database names it as the dataset's current fit,
so readers never see a partial one. Retention (``retire_superseded``): when a new fit is recorded,
fits older than the current one and the ``keep`` before it lose their rows in the same
transaction and their folders after the commit (a crash in between leaves folders without rows,
which the start-up sweep collects).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from service.storage import layout
from service.storage.database import Fit
from service.storage.files import atomic_savez, atomic_write, atomic_write_bytes, load_npz
from service.storage.scores import write_score_files

MODEL = "model.npz"
META = "meta.json"
MAP = "map.arrow"


class FitFiles:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    @classmethod
    def of(cls, data_dir: Path, dataset_id: str, fit_id: str) -> FitFiles:
        return cls(layout.fit_dir(data_dir, dataset_id, fit_id))

    def write(
        self,
        model_arrays: dict[str, np.ndarray],
        scores: pa.Table,
        *,
        num_chunks: int,
        issue_log_odds: np.ndarray | None = None,
    ) -> None:
        atomic_savez(self.directory / MODEL, model_arrays)
        write_score_files(self.directory, scores, issue_log_odds)
        atomic_write_bytes(self.directory / META, json.dumps({"num_chunks": num_chunks}).encode())

    def write_map(self, scores: pa.Table, xy: np.ndarray) -> None:
        """The 2-D map, ``xy`` row-aligned with ``scores`` (the fit's table in its own order),
        stored in the order of scores.arrow (rmd, sample_id) so row i of one is row i of the other."""
        if xy.shape != (scores.num_rows, 2):
            raise ValueError(f"map of shape {xy.shape} for {scores.num_rows} scored rows")
        order = pc.sort_indices(scores, [("rmd", "ascending"), ("sample_id", "ascending")]).to_numpy()
        xy = np.asarray(xy, dtype=np.float32)[order]
        table = pa.table({"x": xy[:, 0], "y": xy[:, 1]})

        def write(fh) -> None:  # type: ignore[no-untyped-def]
            with pa.ipc.new_file(fh, table.schema) as writer:
                writer.write_table(table, max_chunksize=max(table.num_rows, 1))

        atomic_write(self.directory / MAP, write)

    def map_xy(self) -> np.ndarray | None:
        """(N, 2) float32 in scores.arrow's row order; None for a fit without a map."""
        path = self.directory / MAP
        if not path.exists():
            return None
        table = pa.ipc.open_file(pa.memory_map(str(path), "r")).read_all()
        return np.column_stack([table.column("x").to_numpy(), table.column("y").to_numpy()])

    def model_arrays(self) -> dict[str, np.ndarray]:
        return load_npz(self.directory / MODEL)

    def num_chunks(self) -> int:
        return int(json.loads((self.directory / META).read_text())["num_chunks"])

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def retire_superseded(session: Session, dataset_id: str, current_fit_id: str, keep: int) -> list[str]:
    """Delete the rows of the dataset's fits beyond the current one and the ``keep`` newest
    before it (``DIFFICULTY_KEEP_FITS``); returns their IDs. Joins the caller's transaction: the
    caller commits, then removes the folders (``remove_fits``). Kept fits stay readable by a
    request that looked up the current fit just before the new one was recorded."""
    ids = session.scalars(
        select(Fit.id).where(Fit.dataset_id == dataset_id).order_by(Fit.created_at.desc(), Fit.id.desc())
    ).all()
    kept = {current_fit_id, *[i for i in ids if i != current_fit_id][: max(keep, 0)]}
    old = [i for i in ids if i not in kept]
    if old:
        session.execute(delete(Fit).where(Fit.id.in_(old)))
    return old


def remove_fits(data_dir: Path, dataset_id: str, fit_ids: list[str]) -> None:
    for fit_id in fit_ids:
        FitFiles.of(data_dir, dataset_id, fit_id).remove()
