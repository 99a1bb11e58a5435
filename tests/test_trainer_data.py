"""ScoredDataset: joining samples with scores by sample ID, and the missing-score policies."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset
from torchvision.datasets import ImageFolder
from torchvision.transforms import ToTensor

from trainer.data import (
    ScoredDataset,
    ScoreTable,
    image_folder_labels,
    image_folder_sample_ids,
    read_table,
)
from trainer.fmnist import read_idx
from trainer.weights import RANK_T


def table(ids, scores, labels=None) -> pa.Table:
    cols = {"sample_id": ids, "rmd": scores}
    if labels is not None:
        cols["label"] = labels
    return pa.table(cols)


@pytest.fixture()
def folder(tmp_path):
    root = tmp_path / "imgs"
    for cls, names in {"cat": ["001.png", "002.png"], "dog": ["003.png"]}.items():
        (root / cls).mkdir(parents=True)
        for i, name in enumerate(names):
            Image.fromarray(np.full((4, 4, 3), 40 * i, np.uint8)).save(root / cls / name)
    return ImageFolder(str(root), transform=ToTensor())


def test_image_folder_ids_match_archive_paths(folder):
    assert image_folder_sample_ids(folder) == ["cat/001.png", "cat/002.png", "dog/003.png"]
    assert image_folder_labels(folder) == ["cat", "cat", "dog"]


def test_join_by_id_weights_over_whole_table(folder):
    # The table has an extra sample (other.png, the hardest): max and T come from the whole
    # dataset's scores, not from the samples present here.
    scores = ScoreTable.from_arrow(
        table(["dog/003.png", "cat/001.png", "x/other.png", "cat/002.png"], [1.0, 0.0, 3.0, 2.0])
    )
    ds = ScoredDataset(folder, image_folder_sample_ids(folder), scores, mapping="exp-max",
                       temperature=1.0)  # fmt: skip
    assert ds.weights.tolist() == pytest.approx(np.exp([0.0 - 3, 2.0 - 3, 1.0 - 3]).tolist())
    x, y, index = ds[2]
    assert x.shape == (3, 4, 4) and y == 1 and index == 2
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert batch[2].tolist() == [0, 1, 2]
    auto = ScoredDataset(folder, image_folder_sample_ids(folder), scores, mapping="exp-max")
    assert auto.temperature == pytest.approx(np.std([1.0, 0.0, 3.0, 2.0]))
    # The default mapping (quantile, 5th-95th percentile of the whole table: 0.15 and 2.85).
    default = ScoredDataset(folder, image_folder_sample_ids(folder), scores)
    assert default.weight_mapping.mapping == "quantile" and default.temperature is None
    assert default.weights.tolist() == pytest.approx([0.0, 1.85 / 2.7, 0.85 / 2.7], rel=1e-6)
    # Rank, also over the whole table: ranks of 0, 2, 1 among 0..3 are 1, 3, 2 of N = 4.
    rank = ScoredDataset(folder, image_folder_sample_ids(folder), scores, mapping="rank")
    assert rank.weight_mapping.mapping == "rank" and rank.temperature == RANK_T
    assert rank.weights.tolist() == pytest.approx(
        np.exp((np.array([1.0, 3.0, 2.0]) / 4 - 1) / RANK_T).tolist(), rel=1e-6
    )
    quantile = ScoredDataset(folder, image_folder_sample_ids(folder), scores, mapping="quantile",
                             mapping_params={"low": 0.0, "high": 1.0})  # fmt: skip
    assert quantile.temperature is None
    assert quantile.weights.tolist() == pytest.approx([0.0, 2 / 3, 1 / 3], rel=1e-6)


def test_missing_policies(folder):
    ids = image_folder_sample_ids(folder)
    scores = ScoreTable.from_arrow(table(["cat/001.png", "dog/003.png"], [0.0, 1.0]))
    with pytest.raises(KeyError, match=r"1 of 3 samples.*cat/002.png"):
        ScoredDataset(folder, ids, scores)
    dropped = ScoredDataset(folder, ids, scores, missing="drop", mapping="exp-max", temperature=1.0)
    assert len(dropped) == 2 and dropped.sample_ids == ["cat/001.png", "dog/003.png"]
    assert dropped[1][1] == 1  # the dog, through the position map
    zero = ScoredDataset(folder, ids, scores, missing="zero-weight", mapping="exp-max",
                         temperature=1.0)  # fmt: skip
    assert len(zero) == 3 and zero.weights.tolist() == pytest.approx([np.exp(-1.0), 0.0, 1.0])
    assert zero.num_missing == 1
    with pytest.raises(ValueError):
        ScoredDataset(folder, ids, scores, missing="ignore")  # type: ignore[arg-type]
    nothing = ScoreTable.from_arrow(table(["zzz"], [0.0]))
    with pytest.raises(ValueError, match="nothing left"):
        ScoredDataset(folder, ids, nothing, missing="drop")


def test_label_mismatch_means_wrong_dataset(folder):
    ids = image_folder_sample_ids(folder)
    scores = ScoreTable.from_arrow(table(ids, [0.0, 1.0, 2.0], ["cat", "dog", "dog"]))
    with pytest.raises(ValueError, match="different label"):
        ScoredDataset(folder, ids, scores, base_labels=image_folder_labels(folder))
    ok = ScoreTable.from_arrow(table(ids, [0.0, 1.0, 2.0], ["cat", "cat", "dog"]))
    ScoredDataset(folder, ids, ok, base_labels=image_folder_labels(folder))


def test_score_table_validation():
    with pytest.raises(ValueError, match="duplicate"):
        ScoreTable(["a", "a"], [0.0, 1.0])
    with pytest.raises(ValueError, match="NaN"):
        ScoreTable(["a"], [float("nan")])
    with pytest.raises(ValueError, match="column"):
        ScoreTable.from_arrow(pa.table({"sample_id": ["a"]}))
    with pytest.raises(ValueError, match="sample IDs for a dataset"):
        ScoredDataset(
            TensorDataset(torch.zeros(2), torch.zeros(2)), ["a"], ScoreTable(["a"], [0.0])
        )


def test_read_table_formats(tmp_path):
    t = pa.table({"sample_id": ["0", "1"], "label": ["3", "4"], "rmd": [0.5, 1.5]})
    pq.write_table(t, tmp_path / "s.parquet")
    pacsv.write_csv(t, tmp_path / "s.csv")
    with pa.OSFile(str(tmp_path / "s.arrow"), "wb") as sink, ipc.new_file(sink, t.schema) as w:
        w.write_table(t)
    with pa.OSFile(str(tmp_path / "s.arrows"), "wb") as sink, ipc.new_stream(sink, t.schema) as w:
        w.write_table(t)
    for name in ("s.parquet", "s.csv", "s.arrow", "s.arrows"):
        got = read_table(tmp_path / name)
        assert got.column("sample_id").to_pylist() == ["0", "1"], name  # IDs stay strings
        assert ScoreTable.read(tmp_path / name).scores.tolist() == [0.5, 1.5]


def test_idx_reader():
    header = (
        bytes([0, 0, 8, 3])
        + (2).to_bytes(4, "big")
        + (2).to_bytes(4, "big")
        + (3).to_bytes(4, "big")
    )
    arr = read_idx(header + bytes(range(12)))
    assert arr.shape == (2, 2, 3) and arr[1, 1, 2] == 11
    with pytest.raises(ValueError, match="truncated"):
        read_idx(header + bytes(5))
    with pytest.raises(ValueError):
        read_idx(b"\x00\x00\x09\x01")


def test_clipped_scores_anchor_weights_at_a_quantile():
    scores = ScoreTable([str(i) for i in range(5)], [0.0, 1.0, 2.0, 3.0, 1000.0])
    plain = scores.weights_for(["0", "3"], "exp-max", temperature=1.0)
    assert plain[1] == pytest.approx(np.exp(-997.0))  # the outlier owns the anchor
    capped = scores.clipped(0.75)  # quantile 0.75 of the five scores = 3.0
    assert capped.scores.tolist() == [0.0, 1.0, 2.0, 3.0, 3.0]
    assert capped.weights_for(["0", "3", "4"], "exp-max", temperature=1.0).tolist() == pytest.approx(
        [np.exp(-3.0), 1.0, 1.0]
    )
    with pytest.raises(ValueError):
        scores.clipped(0.0)
