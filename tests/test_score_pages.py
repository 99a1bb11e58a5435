"""Keyset pages over the stored score files: every row exactly once, in (rmd, sample_id)
order, also across runs of equal rmd and within one label."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from service.storage.scores import Cursor, page, write_score_files


def scores_table(n: int = 230, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    rmd = rng.integers(0, 12, size=n).astype(np.float64)  # many ties on purpose
    labels = rng.choice(["a", "b", "c"], size=n)
    return pa.table({
        "sample_id": [f"s{i:04d}" for i in rng.permutation(n)],
        "label": labels.tolist(),
        "rmd": rmd,
        "md_class": rmd + 5,
        "md_agnostic": np.full(n, 5.0),
        "rmd_min": rmd - 1,
        "predicted_label": labels.tolist(),
    })


@pytest.mark.parametrize("descending", [False, True])
@pytest.mark.parametrize("label", [None, "b"])
@pytest.mark.parametrize("limit", [1, 7, 1000])
def test_pages_cover_every_row_once_in_order(tmp_path, descending, label, limit):
    table = scores_table()
    write_score_files(tmp_path, table)
    rows = table.to_pylist()
    if label is not None:
        rows = [r for r in rows if r["label"] == label]
    expected = sorted(((r["rmd"], r["sample_id"]) for r in rows), reverse=descending)

    seen, cursor = [], None
    for _ in range(len(rows) + 2):
        items, token = page(tmp_path, limit=limit, cursor=cursor, descending=descending, label=label)
        assert len(items) <= limit
        seen += [(r["rmd"], r["sample_id"]) for r in items]
        if token is None:
            break
        cursor = Cursor.decode(token)
    assert seen == expected


def test_unknown_label_is_an_empty_page(tmp_path):
    write_score_files(tmp_path, scores_table())
    assert page(tmp_path, limit=10, cursor=None, descending=False, label="zzz") == ([], None)
