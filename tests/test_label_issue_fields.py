"""Label-issue fields end to end: the fit job's columns, GET .../label-issues, the summary count
and ``difficulty score --label-issues``, checked against the statistics core called directly and
a brute-force neighbor search."""

from __future__ import annotations

import numpy as np
import pyarrow.csv as pacsv
import pytest
from conftest import npy, wait_for_job
from scipy.stats import rankdata

from service.cli import main
from service.statistics import SufficientStatistics, assign_folds, normalize_features
from service.statistics.label_issues import DEFAULT_THRESHOLD, find_label_issues
from service.statistics.selection import select_shrinkage_by_log_loss

N, D, K, FLIPPED = 600, 8, 3, 45


@pytest.fixture(scope="module")
def noisy(tmp_path_factory):
    rng = np.random.default_rng(11)
    true = rng.integers(0, K, N)
    x = rng.normal(size=(N, D)).astype(np.float32)
    x[:, 0] += 4.0 * true
    x[:, 1] += 2.0  # away from the origin, so the L2-normalised classes stay apart
    given = true.copy()
    flipped = rng.choice(N, FLIPPED, replace=False)
    given[flipped] = (true[flipped] + rng.integers(1, K, FLIPPED)) % K
    ids = [f"s{i:04d}" for i in range(N)]
    folder = tmp_path_factory.mktemp("noisy")
    np.save(folder / "x.npy", x)
    (folder / "y.txt").write_text("".join(f"c{v}\n" for v in given))
    (folder / "ids.txt").write_text("".join(f"{i}\n" for i in ids))
    mask = np.zeros(N, bool)
    mask[flipped] = True
    return folder, x, np.asarray([f"c{v}" for v in given]), np.asarray([f"c{v}" for v in true]), ids, mask


def reference(x, labels, ids):
    """The fields computed directly from the statistics core, without the pipeline."""
    z = normalize_features(x.astype(np.float64))
    stats = SufficientStatistics(dim=D, normalized=True).update(z, labels.tolist(), ids)
    folds = assign_folds(ids, stats.n_folds)
    rho = select_shrinkage_by_log_loss(stats, z.astype(np.float32), labels.tolist(), folds).best
    return find_label_issues(stats, z.astype(np.float32), labels.tolist(), folds, rho, kind="full", refits=1).issues


def brute_neighbors(x, k):
    z = normalize_features(x.astype(np.float64))
    sims = z @ z.T
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def test_fit_serves_label_issue_fields_and_report(api_client, noisy, tmp_path):
    folder, x, given, true, ids, flipped = noisy
    c = api_client
    dataset_id = c.post("/v1/datasets", json={"name": "noisy", "encoder": "feats"}).json()["id"]
    files = {"embeddings": ("x.npy", npy(x)), "labels": ("y.txt", (folder / "y.txt").read_bytes()),
             "ids": ("ids.txt", (folder / "ids.txt").read_bytes())}
    assert c.post(f"/v1/datasets/{dataset_id}/embeddings", files=files).status_code == 201
    job = wait_for_job(c, c.post(f"/v1/datasets/{dataset_id}/fit").json()["job_id"])
    assert job["state"] == "succeeded", job

    rows = {}
    cursor = None
    while True:
        page = c.get(f"/v1/datasets/{dataset_id}/scores", params={"limit": 250, **({"cursor": cursor} if cursor else {})}).json()
        rows.update({r["sample_id"]: r for r in page["items"]})
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(rows) == N
    expected = reference(x, given, ids)
    position = {sample_id: i for i, sample_id in enumerate(ids)}
    for sample_id, row in rows.items():
        i = position[sample_id]
        assert row["label_issue_probability"] == pytest.approx(expected.probability[i], rel=1e-4, abs=1e-7)
        assert row["is_label_issue"] == bool(expected.probability[i] >= DEFAULT_THRESHOLD)
        assert row["suggested_label_probability"] == pytest.approx(expected.suggested_probability[i], rel=1e-4, abs=1e-7)
    probability = np.asarray([rows[s]["label_issue_probability"] for s in ids])
    suggested = np.asarray([rows[s]["suggested_label"] for s in ids])
    # The flipped labels rank first, and the flagged ones get their true class suggested.
    ranks = rankdata(probability)
    auroc = (ranks[flipped].sum() - FLIPPED * (FLIPPED + 1) / 2) / (FLIPPED * (N - FLIPPED))
    assert auroc > 0.9, auroc
    found = flipped & (probability >= DEFAULT_THRESHOLD)
    assert found.sum() >= FLIPPED // 2 and np.mean(suggested[found] == true[found]) > 0.9

    # The report: flagged samples only, most likely first, the evidence a person checks.
    report = c.get(f"/v1/datasets/{dataset_id}/label-issues", params={"limit": 1000}).json()
    assert report["threshold"] == DEFAULT_THRESHOLD
    items = report["items"]
    assert {r["sample_id"] for r in items} == {s for s, r in rows.items() if r["is_label_issue"]}
    shown = [r["label_issue_probability"] for r in items]
    assert shown == sorted(shown, reverse=True)  # most likely first (ties ordered by log-odds)
    assert all(r["is_label_issue"] and r["label_issue_probability"] >= DEFAULT_THRESHOLD for r in items)
    neighbors = brute_neighbors(x, 10)
    for item in items[:5]:
        i = position[item["sample_id"]]
        expected_ids = [ids[j] for j in neighbors[i] if given[j] != given[i]]
        assert sorted(item["disagreeing_neighbors"]) == sorted(expected_ids)
    # Paging every sample with ?all=true visits each once.
    seen, cursor = [], None
    while True:
        page = c.get(f"/v1/datasets/{dataset_id}/label-issues",
                     params={"limit": 128, "all": "true", **({"cursor": cursor} if cursor else {})}).json()
        seen += [r["sample_id"] for r in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert sorted(seen) == sorted(ids)
    assert c.get(f"/v1/datasets/{dataset_id}/label-issues", params={"cursor": "nope"}).status_code == 400

    summary = c.get(f"/v1/datasets/{dataset_id}/summary").json()["classes"]
    assert {s["label"]: s["label_issues"] for s in summary} == {
        label: sum(1 for s in ids if rows[s]["label"] == label and rows[s]["is_label_issue"]) for label in ("c0", "c1", "c2")
    }

    # Offline: the same report as CSV.
    out, issues = tmp_path / "scores.parquet", tmp_path / "issues.csv"
    assert main(["score", "--embeddings", str(folder / "x.npy"), "--labels", str(folder / "y.txt"),
                 "--ids", str(folder / "ids.txt"), "-o", str(out), "--label-issues", str(issues)]) == 0
    offline = pacsv.read_csv(issues).to_pylist()
    assert len(offline) == N
    flagged_offline = [r["sample_id"] for r in offline if r["is_label_issue"]]
    assert flagged_offline == [r["sample_id"] for r in items]
    first = offline[0]
    assert sorted(str(first["disagreeing_neighbors"] or "").split(";") if first["disagreeing_neighbors"] else []) == sorted(items[0]["disagreeing_neighbors"])


def test_label_issues_before_a_fit_is_409(api_client):
    dataset_id = api_client.post("/v1/datasets", json={"name": "empty", "encoder": "feats"}).json()["id"]
    assert api_client.get(f"/v1/datasets/{dataset_id}/label-issues").status_code == 409
    assert api_client.get("/v1/datasets/nope/label-issues").status_code == 404


def test_noise_model_on_a_sample_of_rows_agrees_with_all_rows(noisy):
    """Large fits fit the noise model (T, M) on evenly spaced rows: the fields barely move."""
    _, x, given, _, ids, flipped = noisy
    z = normalize_features(x.astype(np.float64))
    stats = SufficientStatistics(dim=D, normalized=True).update(z, given.tolist(), ids)
    folds = assign_folds(ids, stats.n_folds)
    args = (stats, z.astype(np.float32), given.tolist(), folds, 1e-3)
    full = find_label_issues(*args, kind="full", refits=1, noise_sample=None).issues
    sampled = find_label_issues(*args, kind="full", refits=1, noise_sample=300).issues
    assert np.corrcoef(full.log_odds, sampled.log_odds)[0, 1] > 0.99
    assert np.mean(full.is_issue == sampled.is_issue) > 0.97


def test_logsumexp_matches_scipy_with_infinite_entries():
    from scipy.special import logsumexp as reference_logsumexp

    from service.statistics.selection import logsumexp

    rng = np.random.default_rng(3)
    a = rng.normal(scale=50.0, size=(200, 7))
    a[3, 2] = -np.inf
    a[5, :] = -np.inf
    a[7, :] = 1e300  # large but finite: no overflow
    for axis in (0, 1):
        for keepdims in (False, True):
            np.testing.assert_allclose(
                logsumexp(a, axis=axis, keepdims=keepdims), reference_logsumexp(a, axis=axis, keepdims=keepdims), rtol=1e-12
            )
