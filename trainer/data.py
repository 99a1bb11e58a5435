"""Join a user's training samples with the service's difficulty scores by sample ID.

The service identifies samples by ID: for an uploaded ImageFolder archive, the path inside the
archive (``cat/001.png``), which is the path relative to the folder's root here; for uploaded
embeddings, the IDs sent with them (default: the row index as text). :class:`ScoredDataset`
wraps any map-style dataset, yields ``(x, y, index)`` and holds the per-sample weight table that
:class:`trainer.losses.DifficultyAwareLoss` indexes with ``index`` (weights by a named mapping of
:mod:`trainer.weights`, computed over the whole score table once).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
from torch.utils.data import Dataset

from trainer.weights import DEFAULT_MAPPING, Temperature, WeightMapping, map_scores

MissingPolicy = Literal["error", "drop", "zero-weight"]
MISSING_POLICIES: tuple[str, ...] = ("error", "drop", "zero-weight")


class ScoreTable:
    """Scores of one fitted dataset, by sample ID. ``column`` picks the score (default ``rmd``,
    the difficulty w.r.t. the given label; ``rmd_min`` is the label-free one)."""

    def __init__(
        self,
        sample_ids: Sequence[str],
        scores: Sequence[float] | np.ndarray,
        labels: Sequence[str] | None = None,
    ) -> None:
        self.sample_ids = [str(s) for s in sample_ids]
        self.scores = np.asarray(scores, dtype=np.float64)
        self.labels = None if labels is None else [str(v) for v in labels]
        if self.scores.shape != (len(self.sample_ids),):
            raise ValueError("one score per sample ID expected")
        if len(self.sample_ids) == 0:
            raise ValueError("the score table is empty")
        if not np.isfinite(self.scores).all():
            raise ValueError("the score table contains NaN or inf scores")
        self.row = {sid: i for i, sid in enumerate(self.sample_ids)}
        if len(self.row) != len(self.sample_ids):
            raise ValueError("the score table has duplicate sample IDs")

    @classmethod
    def from_arrow(cls, table: pa.Table, column: str = "rmd") -> ScoreTable:
        for name in ("sample_id", column):
            if name not in table.column_names:
                raise ValueError(f"score table has no column {name!r} (has {table.column_names})")
        labels = table.column("label").to_pylist() if "label" in table.column_names else None
        return cls(
            table.column("sample_id").to_pylist(),
            table.column(column).to_numpy(zero_copy_only=False),
            labels,
        )

    @classmethod
    def read(cls, path: str | os.PathLike[str], column: str = "rmd") -> ScoreTable:
        """A score file written by ``difficulty score`` (.parquet, .arrow, .csv) or a cached
        Arrow stream."""
        return cls.from_arrow(read_table(path), column)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def clipped(self, quantile: float) -> ScoreTable:
        """Scores capped at their ``quantile`` (opt-in, before any mapping).

        Why it exists: the original ``exp-max`` mapping is anchored at the single hardest
        sample, and real RMD is heavy-tailed (Fashion-MNIST + EfficientNet-Lite0: median -4,
        99th percentile 49, max 3,848), so a cap at e.g. the 99th percentile anchors it at
        "hard" instead of at the outlier. The default quantile mapping caps by itself, and the
        rank mapping is unchanged by any cap.
        """
        if not 0.0 < quantile <= 1.0:
            raise ValueError(f"clip quantile must be in (0, 1], got {quantile}")
        cap = float(np.quantile(self.scores, quantile))
        return ScoreTable(self.sample_ids, np.minimum(self.scores, cap), self.labels)

    def weight_mapping(self, mapping: str = DEFAULT_MAPPING, **params: Any) -> WeightMapping:
        """The weights of the whole table (every rank, quantile or maximum is taken over all of
        its scores, never per batch or subset), with the resolved parameters."""
        return map_scores(self.scores, mapping, **params)

    def weights_for(
        self, sample_ids: Sequence[str], mapping: str = DEFAULT_MAPPING, **params: Any
    ) -> np.ndarray:
        """:meth:`weight_mapping`'s weights picked for ``sample_ids``; NaN where absent."""
        return self.pick(self.weight_mapping(mapping, **params).weights, sample_ids)

    def pick(self, values: np.ndarray, sample_ids: Sequence[str]) -> np.ndarray:
        """``values`` (one per table row) for ``sample_ids``, in their order; NaN where absent."""
        rows = np.array([self.row.get(str(s), -1) for s in sample_ids], dtype=np.int64)
        out = np.full(len(rows), np.nan)
        found = rows >= 0
        out[found] = np.asarray(values, dtype=np.float64)[rows[found]]
        return out


def read_table(path: str | os.PathLike[str]) -> pa.Table:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return pq.read_table(path)
    if suffix == ".csv":
        return pacsv.read_csv(
            path,
            convert_options=pacsv.ConvertOptions(
                column_types={
                    "sample_id": pa.string(),
                    "label": pa.string(),
                    "predicted_label": pa.string(),
                }
            ),
        )
    data = pa.memory_map(str(path))
    try:  # .arrow may be the IPC file format (difficulty score) or a stream (the service)
        return ipc.open_file(data).read_all()
    except pa.ArrowInvalid:
        data.seek(0)
        return ipc.open_stream(data).read_all()


class ScoredDataset(Dataset):
    """``base`` (any map-style dataset yielding ``(x, y)``) joined with scores by sample ID.

    Yields ``(x, y, index)``: ``index`` is the position in this wrapper and keys
    :attr:`weights`, made by ``mapping`` (:mod:`trainer.weights`) with ``temperature`` ("auto":
    the mapping's default) and any other ``mapping_params`` (e.g. quantile ``low``/``high``);
    :attr:`weight_mapping` records what was used. Samples the table does not know follow ``missing``:
    ``"error"`` (default) raises, listing some of them; ``"drop"`` leaves them out;
    ``"zero-weight"`` keeps them with weight 0, i.e. plain cross-entropy for them.
    With ``base_labels`` (label names per base sample) a label that differs from the one the
    service was given raises: it almost always means the wrong dataset ID.
    """

    def __init__(
        self,
        base: Dataset,
        sample_ids: Sequence[str],
        scores: ScoreTable,
        *,
        mapping: str = DEFAULT_MAPPING,
        temperature: Temperature = "auto",
        mapping_params: dict[str, Any] | None = None,
        missing: MissingPolicy = "error",
        base_labels: Sequence[str] | None = None,
    ) -> None:
        if missing not in MISSING_POLICIES:
            raise ValueError(f"missing must be one of {MISSING_POLICIES}, got {missing!r}")
        if len(sample_ids) != len(base):  # type: ignore[arg-type]
            raise ValueError(f"{len(sample_ids)} sample IDs for a dataset of {len(base)} samples")  # type: ignore[arg-type]
        self.base = base
        self.weight_mapping = scores.weight_mapping(
            mapping, temperature=temperature, **(mapping_params or {})
        )
        weights = scores.pick(self.weight_mapping.weights, sample_ids)
        absent = np.flatnonzero(np.isnan(weights))
        self.num_missing = len(absent)
        if len(absent) and missing == "error":
            examples = ", ".join(repr(sample_ids[i]) for i in absent[:5])
            raise KeyError(
                f"{len(absent)} of {len(sample_ids)} samples have no difficulty score (e.g. {examples}); "
                "check the dataset ID and sample IDs, or choose missing='drop' / 'zero-weight'"
            )
        keep = np.arange(len(sample_ids))
        if missing == "drop":
            keep = np.flatnonzero(~np.isnan(weights))
            if len(keep) == 0:
                raise ValueError("no sample has a difficulty score: nothing left to train on")
        self.positions = keep
        self.sample_ids = [str(sample_ids[i]) for i in keep]
        self.weights = np.nan_to_num(weights[keep], nan=0.0).astype(np.float32)
        # The resolved temperature (None for mappings without one, e.g. quantile).
        self.temperature: float | None = self.weight_mapping.params.get("temperature")
        if base_labels is not None and scores.labels is not None:
            _check_labels(self.sample_ids, [base_labels[i] for i in keep], scores)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        x, y = self.base[int(self.positions[index])]
        return x, y, index


def _check_labels(sample_ids: Sequence[str], labels: Sequence[str], scores: ScoreTable) -> None:
    assert scores.labels is not None
    bad = [
        (sid, lab, scores.labels[scores.row[sid]])
        for sid, lab in zip(sample_ids, labels, strict=True)
        if sid in scores.row and str(lab) != scores.labels[scores.row[sid]]
    ]
    if bad:
        examples = "; ".join(f"{sid}: here {a!r}, service {b!r}" for sid, a, b in bad[:3])
        raise ValueError(
            f"{len(bad)} samples carry a different label than the service was given ({examples}); "
            "is this the right dataset ID?"
        )


def image_folder_sample_ids(dataset: Any) -> list[str]:
    """Sample IDs of a torchvision ImageFolder: each file's path relative to the root, with '/'
    separators, as the service names the members of an uploaded ImageFolder archive."""
    root = Path(dataset.root)
    return [Path(path).relative_to(root).as_posix() for path, _ in dataset.samples]


def image_folder_labels(dataset: Any) -> list[str]:
    return [dataset.classes[target] for _, target in dataset.samples]


class IndexedDataset(Dataset):
    """``(x, y, index)`` without scores, so every loss sees the same batch layout."""

    def __init__(self, base: Dataset) -> None:
        self.base = base
        self.positions = np.arange(len(base))  # type: ignore[arg-type]
        self.weights = None

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, index: int) -> tuple[Any, Any, int]:
        x, y = self.base[index]
        return x, y, index
