"""The list-by-list self-join of the kNN column (``pipeline.list_join``): against a float64 brute
force over each query's candidate rows, against faiss's own inverted-file search with the same
lists, with short lists padded, and invariant to the order of the rows.

Cost: ~2 s."""

from __future__ import annotations

import numpy as np
import pytest

from service.pipeline.list_join import list_top_k
from service.pipeline.neighbors import build_ivf_index, ivf_self_neighbors


def _data(n: int, d: int, lists: int, probes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    # Each row probes `probes` distinct lists; its first is the one it is stored in.
    probe = np.stack([rng.choice(lists, probes, replace=False) for _ in range(n)])
    return x, probe


def _reference(x: np.ndarray, probe: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query, float64 inner products with every member of its probed lists, best k."""
    x64 = x.astype(np.float64)
    home = probe[:, 0]
    sims = np.full((len(x), k), -np.inf)
    rows = np.full((len(x), k), -1)
    for q in range(len(x)):
        candidates = np.flatnonzero(np.isin(home, probe[q]))
        s = x64[candidates] @ x64[q]
        order = np.argsort(-s)[:k]
        sims[q, : len(order)], rows[q, : len(order)] = s[order], candidates[order]
    return sims, rows


@pytest.mark.parametrize(("n", "lists", "probes", "k"), [(400, 20, 3, 7), (300, 50, 1, 4), (200, 5, 5, 11)])
def test_equals_a_float64_brute_force_over_each_querys_candidates(n, lists, probes, k):
    x, probe = _data(n, 12, lists, probes, seed=n)
    sims, rows = list_top_k(x, probe, k)
    want_sims, want_rows = _reference(x, probe, k)
    np.testing.assert_array_equal(rows, want_rows)
    np.testing.assert_allclose(sims, want_sims, rtol=0, atol=1e-5)  # float32 products of |x| ~ 3.5


def test_short_lists_are_padded_with_minus_one():
    x, probe = _data(30, 4, lists=15, probes=1, seed=1)  # ~2 members per list, k = 6
    sims, rows = list_top_k(x, probe, 6)
    want_sims, want_rows = _reference(x, probe, 6)
    np.testing.assert_array_equal(rows, want_rows)
    assert (rows == -1).any() and np.isneginf(sims[rows == -1]).all()


def test_row_order_does_not_change_the_answer():
    x, probe = _data(500, 8, lists=25, probes=4, seed=3)
    perm = np.random.default_rng(4).permutation(500)
    _, rows = list_top_k(x, probe, 5)
    _, rows_permuted = list_top_k(x[perm], probe[perm], 5)
    inverse = np.argsort(perm)
    np.testing.assert_array_equal(perm[rows_permuted][inverse], rows)


def test_progress_is_reported_in_samples(monkeypatch):
    import service.pipeline.list_join as list_join

    monkeypatch.setattr(list_join, "PROGRESS_PAIRS", 1)
    x, probe = _data(200, 4, lists=10, probes=2, seed=5)
    done: list[int] = []
    list_top_k(x, probe, 3, progress=done.append)
    assert done and done == sorted(done) and done[0] >= 0 and done[-1] < 200


def test_the_same_neighbours_as_faiss_inverted_file_search():
    rng = np.random.default_rng(6)
    centres = rng.normal(size=(20, 24))
    x = (centres[rng.integers(0, 20, 4000)] + rng.normal(size=(4000, 24))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = build_ivf_index(x)  # the same trained lists and probes (faiss's fixed seed)
    faiss_rows = index.search(x, 11)[1]
    ours = ivf_self_neighbors(x, 11)
    # Equal up to the order of near-ties, where float32 sums in another order may swap two rows.
    same_sets = [set(a) == set(b) for a, b in zip(ours, faiss_rows, strict=True)]
    assert np.mean(same_sets) > 0.998
    assert np.mean(ours[:, 0] == np.arange(4000)) > 0.999  # each row finds itself first
