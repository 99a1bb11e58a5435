"""The statistics core against a brute-force float64 reference built with explicit inverses."""

from __future__ import annotations

import numpy as np
import pytest

from service.statistics import (
    SHRINKAGE_GRID,
    FitError,
    GaussianModel,
    SufficientStatistics,
    assign_folds,
    cross_validate_shrinkage,
    fit_gaussians,
    normalize_features,
)
from service.statistics.selection import fold_gaussians

RTOL = 1e-6


def make_data(rng, n=600, d=8, k=4, offset=0.0, scales=None, labels=None):
    means = rng.normal(scale=3.0, size=(k, d))
    y = rng.integers(0, k, size=n) if labels is None else labels
    noise = rng.normal(size=(n, d))
    if scales is not None:
        basis, _ = np.linalg.qr(rng.normal(size=(d, d)))
        noise = (noise * scales) @ basis.T
    x = means[y] + noise + offset
    return x, y


def stats_of(x, labels, ids=None):
    ids = [f"s{i}" for i in range(len(x))] if ids is None else ids
    return SufficientStatistics(dim=x.shape[1]).update(x, [str(v) for v in labels], ids)


def reference(x, labels, rho, rho0, normalize=False):
    """Textbook formulas: explicit means, covariances divided by N, explicit inverses."""
    x = np.asarray(x, dtype=np.float64)
    if normalize:
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    labels = np.asarray([str(v) for v in labels])
    classes = sorted(set(labels))
    n, d = x.shape
    mu = np.stack([x[labels == c].mean(axis=0) for c in classes])
    idx = np.array([classes.index(c) for c in labels])
    centred = x - mu[idx]
    sigma = centred.T @ centred / n
    mu0 = x.mean(axis=0)
    sigma0 = (x - mu0).T @ (x - mu0) / n

    def shrunk(s, r):
        return (1 - r) * s + r * np.trace(s) / d * np.eye(d)

    p = np.linalg.inv(shrunk(sigma, rho))
    p0 = np.linalg.inv(shrunk(sigma0, rho0))
    diff = x[:, None, :] - mu[None, :, :]
    md_all = np.einsum("nkd,de,nke->nk", diff, p, diff)
    md0 = np.einsum("nd,de,ne->n", x - mu0, p0, x - mu0)
    rmd_all = md_all - md0[:, None]
    return {
        "md_class": md_all[np.arange(n), idx],
        "md_agnostic": md0,
        "rmd": rmd_all[np.arange(n), idx],
        "rmd_min": rmd_all.min(axis=1),
        "predicted_label": np.asarray(classes)[rmd_all.argmin(axis=1)],
        "means": mu,
        "sigma": sigma,
        "sigma0": sigma0,
    }


def assert_scores_match(got, ref, rtol=RTOL):
    # Relative to the scale of the distances: rmd can cross zero, so a per-element relative
    # error would be meaningless there.
    for key in ("md_class", "md_agnostic", "rmd", "rmd_min"):
        scale = np.abs(ref["md_agnostic"]).max() + np.abs(ref["md_class"]).max()
        err = np.abs(got[key] - ref[key]).max() / scale
        assert err < rtol, f"{key}: relative error {err:.2e}"
    np.testing.assert_array_equal(got["predicted_label"], ref["predicted_label"])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("rho", [0.0, 1e-3, 0.3, 1.0])
def test_fit_and_scores_match_reference(seed, rho):
    rng = np.random.default_rng(seed)
    x, y = make_data(rng)
    model = fit_gaussians(stats_of(x, y), rho)
    ref = reference(x, y, rho, rho)
    np.testing.assert_allclose(model.means, ref["means"], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(model.covariance, ref["sigma"], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(model.covariance_agnostic, ref["sigma0"], rtol=1e-9, atol=1e-12)
    assert_scores_match(model.score(x, [str(v) for v in y]), ref)


def test_ill_conditioned_covariance():
    rng = np.random.default_rng(3)
    d = 10
    scales = np.logspace(0, -3, d)  # covariance condition number ~1e6
    x, y = make_data(rng, n=5000, d=d, k=3, scales=scales)
    cov = np.cov(x.T, bias=True)
    assert np.linalg.cond(cov) > 1e5
    model = fit_gaussians(stats_of(x, y), 0.0)
    assert_scores_match(model.score(x, [str(v) for v in y]), reference(x, y, 0.0, 0.0))


def test_large_offset_loses_no_precision():
    rng = np.random.default_rng(4)
    x, y = make_data(rng, n=2000, d=6, k=3)
    model = fit_gaussians(stats_of(x + 1e3, y), 1e-4)
    ref = reference(x, y, 1e-4, 1e-4)  # distances do not depend on the offset
    assert_scores_match(model.score(x + 1e3, [str(v) for v in y]), ref)


def test_normalized_features_match_reference():
    rng = np.random.default_rng(5)
    x, y = make_data(rng, n=800, d=8, k=3, offset=2.0)
    stats = SufficientStatistics(dim=8, normalized=True).update(
        normalize_features(x), [str(v) for v in y], [str(i) for i in range(len(y))]
    )
    model = fit_gaussians(stats, 0.01)
    assert_scores_match(model.score(x, [str(v) for v in y]), reference(x, y, 0.01, 0.01, True))


def test_n_below_d_needs_shrinkage_and_says_so():
    rng = np.random.default_rng(6)
    x, y = make_data(rng, n=20, d=50, k=2)
    with pytest.raises(FitError, match="[Ss]hrinkage"):
        fit_gaussians(stats_of(x, y), 0.0)
    model = fit_gaussians(stats_of(x, y), "auto")
    assert model.shrinkage > 0
    ref = reference(x, y, model.shrinkage, model.shrinkage_agnostic)
    assert_scores_match(model.score(x, [str(v) for v in y]), ref)


def test_single_class_gives_zero_relative_distance():
    rng = np.random.default_rng(7)
    x, _ = make_data(rng, n=300, d=5, k=1)
    y = ["only"] * len(x)
    model = fit_gaussians(stats_of(x, y), 0.01)
    scores = model.score(x, y)
    np.testing.assert_allclose(scores["rmd"], 0.0, atol=1e-9)
    assert set(scores["predicted_label"]) == {"only"}


def test_class_with_one_sample_and_string_labels():
    rng = np.random.default_rng(8)
    x, y = make_data(rng, n=200, d=4, k=3)
    names = np.array(["cat", "dog", "émeu 🐦"])
    labels = names[y].tolist()
    x = np.vstack([x, rng.normal(size=(1, 4)) + 10])
    labels.append("lonely/one")
    model = fit_gaussians(stats_of(x, labels), 0.05)
    assert list(model.classes) == sorted(set(labels))
    assert_scores_match(model.score(x, labels), reference(x, labels, 0.05, 0.05))


def test_chunked_and_merged_equals_one_shot():
    rng = np.random.default_rng(9)
    x, y = make_data(rng, n=1000, d=6, k=5, offset=50.0)
    labels = [str(v) for v in y]
    ids = [f"id-{i}" for i in range(len(x))]
    whole = SufficientStatistics(dim=6).update(x, labels, ids)
    # Two workers, each streaming chunks; different references; classes appear in new orders.
    a = SufficientStatistics(dim=6)
    for s in range(0, 400, 97):
        a.update(x[s : min(s + 97, 400)], labels[s : min(s + 97, 400)], ids[s : min(s + 97, 400)])
    b = SufficientStatistics(dim=6).update(x[400:] - 0.0, labels[400:], ids[400:])
    a_counts_before = a.counts.copy()
    running = SufficientStatistics(dim=6).merge_in_place(a).merge_in_place(b)  # a running total
    np.testing.assert_array_equal(a.counts, a_counts_before)  # the merged-in side is unchanged
    for merged in (a.merge(b), b.merge(a), running):
        np.testing.assert_array_equal(merged.count, whole.count)
        m1, m2 = fit_gaussians(merged, "auto"), fit_gaussians(whole, "auto")
        np.testing.assert_allclose(m1.covariance, m2.covariance, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(m1.means, m2.means, rtol=1e-12)
        assert (m1.shrinkage, m1.shrinkage_agnostic) == (m2.shrinkage, m2.shrinkage_agnostic)
        np.testing.assert_allclose(
            m1.cross_validation.log_likelihood_tied, m2.cross_validation.log_likelihood_tied, rtol=1e-9
        )
        s1, s2 = m1.score(x, labels), m2.score(x, labels)
        np.testing.assert_allclose(s1["rmd"], s2["rmd"], rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_block_sizes_change_nothing(monkeypatch, rows):
    # The update works through reused blocks of rows; blocks that cut through folds and classes
    # (and blocks of one row) must give what one block gives, and the reference; so must
    # scoring batches of the same sizes. float32 input must give what its exact float64 copy gives.
    import service.statistics.gaussian as gaussian
    import service.statistics.sufficient as sufficient

    rng = np.random.default_rng(12)
    x, y = make_data(rng, n=500, d=6, k=5, offset=20.0)
    x = x.astype(np.float32)
    untouched = x.copy()
    labels = [str(v) for v in y]
    whole = fit_gaussians(stats_of(x.astype(np.float64), labels), 0.1)
    expected = whole.score(x.astype(np.float64), labels)
    monkeypatch.setattr(sufficient, "BLOCK_BYTES", rows * 8 * 6)
    monkeypatch.setattr(gaussian, "SCORE_BLOCK_BYTES", rows * 8 * 6)
    blocked = fit_gaussians(stats_of(x, labels), 0.1)
    np.testing.assert_allclose(blocked.covariance, whole.covariance, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(blocked.means, whole.means, rtol=1e-13)
    got = blocked.score(x, labels)
    for key in ("md_class", "md_agnostic", "rmd", "rmd_min"):
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(got["predicted_label"], expected["predicted_label"])
    assert_scores_match(got, reference(x.astype(np.float64), labels, 0.1, 0.1))
    np.testing.assert_array_equal(x, untouched)  # the caller's array is never written


def test_merge_with_empty_and_serialisation_round_trip():
    rng = np.random.default_rng(10)
    x, y = make_data(rng, n=300, d=5, k=3)
    stats = stats_of(x, y)
    empty = SufficientStatistics(dim=5)
    assert stats.merge(empty).count == stats.count == empty.merge(stats).count
    again = SufficientStatistics.from_arrays(stats.to_arrays())
    m1, m2 = fit_gaussians(stats, "auto"), fit_gaussians(again, "auto")
    np.testing.assert_array_equal(m1.covariance, m2.covariance)
    restored = GaussianModel.from_arrays(m1.to_arrays())
    labels = [str(v) for v in y]
    np.testing.assert_array_equal(restored.score(x, labels)["rmd"], m1.score(x, labels)["rmd"])


def test_permutation_changes_nothing():
    rng = np.random.default_rng(11)
    x, y = make_data(rng, n=700, d=6, k=4)
    ids = [f"s{i}" for i in range(len(x))]
    labels = [str(v) for v in y]
    perm = rng.permutation(len(x))
    m1 = fit_gaussians(SufficientStatistics(dim=6).update(x, labels, ids), "auto")
    m2 = fit_gaussians(
        SufficientStatistics(dim=6).update(x[perm], [labels[i] for i in perm], [ids[i] for i in perm]),
        "auto",
    )
    assert m1.shrinkage == m2.shrinkage
    np.testing.assert_allclose(m1.covariance, m2.covariance, rtol=1e-9, atol=1e-13)
    s1 = m1.score(x, labels)
    s2 = m2.score(x[perm], [labels[i] for i in perm])
    np.testing.assert_allclose(s1["rmd"][perm], s2["rmd"], rtol=1e-8, atol=1e-10)


def test_moving_towards_another_class_increases_rmd():
    rng = np.random.default_rng(12)
    x, y = make_data(rng, n=900, d=6, k=3)
    labels = [str(v) for v in y]
    model = fit_gaussians(stats_of(x, y), 0.01)
    own = model.means[0]
    other = model.means[1]
    steps = [own + t * (other - own) for t in np.linspace(0, 1, 6)]
    rmd = model.score(np.stack(steps), ["0"] * 6)["rmd"]
    assert np.all(np.diff(rmd) > 0), rmd
    assert model.score(other[None], ["0"])["rmd"][0] > model.score(other[None], ["1"])["rmd"][0]
    del labels


def held_out_log_likelihood_direct(x, labels, ids, grid):
    """For each rho: sum over folds of log N(z; mu_train, Sigma_train,rho) over held-out z."""
    folds = assign_folds(ids)
    labels = np.asarray(labels)
    d = x.shape[1]
    tied = np.zeros(len(grid))
    agnostic = np.zeros(len(grid))
    for f in range(5):
        tr, te = folds != f, folds == f
        xt, yt = x[tr], labels[tr]
        classes = sorted(set(yt))
        mu = {c: xt[yt == c].mean(axis=0) for c in classes}
        mu0 = xt.mean(axis=0)
        c_tr = xt - np.stack([mu[c] for c in yt])
        s = c_tr.T @ c_tr / len(xt)
        s0 = (xt - mu0).T @ (xt - mu0) / len(xt)
        held = x[te] - np.stack([mu.get(c, mu0) for c in labels[te]])
        held0 = x[te] - mu0
        for i, rho in enumerate(grid):
            for cov, h, out in ((s, held, tied), (s0, held0, agnostic)):
                c = (1 - rho) * cov + rho * np.trace(cov) / d * np.eye(d)
                _, logdet = np.linalg.slogdet(c)
                quad = np.einsum("nd,de,ne->n", h, np.linalg.inv(c), h)
                out[i] += (-0.5 * (d * np.log(2 * np.pi) + logdet + quad)).sum()
    return tied, agnostic


@pytest.mark.parametrize(("n", "d"), [(60, 12), (400, 12), (3000, 6)])
def test_auto_shrinkage_maximises_held_out_likelihood(n, d):
    rng = np.random.default_rng(n)
    x, y = make_data(rng, n=n, d=d, k=3, scales=np.logspace(0, -2, d))
    labels = [str(v) for v in y]
    ids = [f"sample/{i}.png" for i in range(n)]
    cv = cross_validate_shrinkage(SufficientStatistics(dim=d).update(x, labels, ids))
    tied, agnostic = held_out_log_likelihood_direct(x, labels, ids, SHRINKAGE_GRID)
    np.testing.assert_allclose(cv.log_likelihood_tied, tied, rtol=1e-8)
    np.testing.assert_allclose(cv.log_likelihood_agnostic, agnostic, rtol=1e-8)
    stats = SufficientStatistics(dim=d).update(x, labels, ids)
    model = fit_gaussians(stats, "auto")
    assert model.shrinkage == SHRINKAGE_GRID[int(np.argmax(tied))]
    assert model.shrinkage_agnostic == SHRINKAGE_GRID[int(np.argmax(agnostic))]
    # The fit job hands over the label-issue model's fold eigendecompositions: same curve.
    shared = cross_validate_shrinkage(stats, fold_models=fold_gaussians(stats))
    np.testing.assert_allclose(shared.log_likelihood_tied, tied, rtol=1e-8)
    assert fit_gaussians(stats, "auto", fold_gaussians(stats)).shrinkage == model.shrinkage


def test_unlabelled_scoring_and_unknown_labels():
    rng = np.random.default_rng(13)
    x, y = make_data(rng, n=300, d=4, k=3)
    model = fit_gaussians(stats_of(x, y), 0.01)
    scores = model.score(x)
    assert set(scores) == {"md_agnostic", "rmd_min", "predicted_label"}
    with pytest.raises(ValueError, match="not one of"):
        model.score(x[:2], ["0", "nope"])


def test_scoring_never_builds_n_by_n():
    # 300k x 300k float64 would be 720 GB: this only passes if memory is O(batch x K).
    rng = np.random.default_rng(14)
    x, y = make_data(rng, n=300_000, d=4, k=3)
    model = fit_gaussians(stats_of(x[:5000], y[:5000]), 0.01)
    out = model.score(x, [str(v) for v in y])
    assert out["rmd"].shape == (300_000,)


@pytest.mark.parametrize(
    "bad",
    [np.array([[np.nan, 1.0]]), np.array([[np.inf, 1.0]])],
)
def test_non_finite_features_are_refused(bad):
    with pytest.raises(ValueError, match="NaN or inf"):
        SufficientStatistics(dim=2).update(bad, ["a"], ["x"])


def test_bad_inputs_to_fit():
    with pytest.raises(FitError, match="at least 2"):
        fit_gaussians(SufficientStatistics(dim=2).update(np.ones((1, 2)), ["a"], ["x"]), 0.1)
    same = SufficientStatistics(dim=2).update(np.ones((10, 2)), ["a"] * 10, [str(i) for i in range(10)])
    with pytest.raises(FitError, match="identical"):
        fit_gaussians(same, 0.1)
    rng = np.random.default_rng(0)
    ok = SufficientStatistics(dim=2).update(rng.normal(size=(10, 2)), ["a"] * 10, [str(i) for i in range(10)])
    for shrinkage in (-0.1, 1.5, "lots"):
        with pytest.raises(FitError, match="shrinkage"):
            fit_gaussians(ok, shrinkage)
    with pytest.raises(ValueError, match="shape"):
        SufficientStatistics(dim=3).update(np.ones((2, 2)), ["a", "b"], ["1", "2"])
    with pytest.raises(ValueError, match="labels"):
        SufficientStatistics(dim=2).update(np.ones((2, 2)), ["a"], ["1", "2"])


def test_folds_depend_only_on_ids():
    ids = [f"img/{i}.jpg" for i in range(1000)]
    folds = assign_folds(ids)
    np.testing.assert_array_equal(folds, assign_folds(list(reversed(ids)))[::-1])
    assert set(np.bincount(folds)) and np.bincount(folds).min() > 150


def test_auto_shared_uses_the_tied_choice_for_both():
    rng = np.random.default_rng(21)
    x, y = make_data(rng, n=60, d=12, k=3, scales=np.logspace(0, -2, 12))
    stats = stats_of(x, y)
    auto = fit_gaussians(stats, "auto")
    shared = fit_gaussians(stats, "auto-shared")
    assert shared.shrinkage == shared.shrinkage_agnostic == auto.shrinkage
    ref = reference(x, y, shared.shrinkage, shared.shrinkage)
    assert_scores_match(shared.score(x, [str(v) for v in y]), ref)
