"""Label-issue core and shrinkage selection against brute-force float64 references.

The references use explicit inverses of the shrunk covariances, fitted from the raw rows of
the training folds, and per-sample Python loops: nothing shared with the code under test but
the conventions (covariance divided by N, ``(1 - rho) S + rho tr(S)/D I``, log class priors).
Whole file: 23 tests, about 10-15 s on the shared 2-core machine (under load).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import logsumexp

from service.statistics import SufficientStatistics, assign_folds, fit_gaussians
from service.statistics import rows as rows_module
from service.statistics.label_issues import (
    LabelNoise,
    class_distances,
    find_label_issues,
    fit_label_noise,
    fit_log_temperature,
    label_issues,
    log_prior_from_counts,
    out_of_fold_distances,
    out_of_fold_relative_distances,
    soft_fold_moments,
    wrong_label_log_odds,
)
from service.statistics.selection import (
    HeldOutLogLoss,
    fold_gaussians,
    log_posterior,
    select_shrinkage_by_log_loss,
)


def make_data(
    n: int, d: int, k: int, seed: int, offset: float = 0.0, scales: np.ndarray | None = None,
    spread: float = 2.0,
):  # fmt: skip
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, spread, (k, d))
    y = np.arange(n) % k
    rng.shuffle(y)
    x = centres[y] + rng.normal(size=(n, d))
    if scales is not None:
        x = x * scales
    x = x + offset
    ids = [f"s{seed}-{i}" for i in range(n)]
    return x, y, ids


def stats_of(x: np.ndarray, y: np.ndarray, ids: list[str], normalized: bool = False) -> SufficientStatistics:
    stats = SufficientStatistics(dim=x.shape[1], normalized=normalized)
    return stats.update(x, [f"c{v}" for v in y], ids)


def brute_shrunk_inverse(x: np.ndarray, y: np.ndarray, classes: list[int], rho: float):
    """Class means, log priors and the inverse shrunk tied covariance from raw rows."""
    n, d = x.shape
    means = {}
    scatter = np.zeros((d, d))
    for c in classes:
        rows = x[y == c]
        if rows.shape[0] == 0:
            continue
        means[c] = rows.mean(axis=0)
        for row in rows:
            diff = row - means[c]
            scatter += np.outer(diff, diff)
    cov = scatter / n
    shrunk = (1 - rho) * cov + rho * np.trace(cov) / d * np.eye(d)
    priors = {c: np.log((y == c).sum() / n) for c in means}
    return means, priors, np.linalg.inv(shrunk)


def brute_out_of_fold(x, y, folds, k, rho):
    """(N, K) distances and (N, K) log priors, each sample against the other folds' fit."""
    n = x.shape[0]
    dist = np.full((n, k), np.nan)
    prior = np.full((n, k), -np.inf)
    for f in np.unique(folds):
        train = folds != f
        means, priors, inv = brute_shrunk_inverse(x[train], y[train], list(range(k)), rho)
        for i in np.flatnonzero(folds == f):
            for c in range(k):
                if c in means:
                    diff = x[i] - means[c]
                    dist[i, c] = diff @ inv @ diff
                    prior[i, c] = priors[c]
    return dist, prior


def test_class_distances_match_explicit_inverse_and_md_class() -> None:
    x, y, ids = make_data(60, 7, 3, seed=1, offset=5.0)
    stats = stats_of(x, y, ids)
    model = fit_gaussians(stats, 0.05)
    got = class_distances(model, x)
    means, _, inv = brute_shrunk_inverse(x, y, [0, 1, 2], 0.05)
    for i in range(x.shape[0]):
        for c in range(3):
            diff = x[i] - means[c]
            assert got[i, c] == pytest.approx(diff @ inv @ diff, rel=1e-9, abs=1e-9)
    md_class = model.score(x, [f"c{v}" for v in y])["md_class"]
    np.testing.assert_allclose(got[np.arange(60), y], md_class, rtol=1e-9, atol=1e-9)


def test_class_distances_normalise_like_the_model() -> None:
    x, y, ids = make_data(50, 6, 2, seed=2, offset=3.0)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    model = fit_gaussians(stats_of(unit, y, ids, normalized=True), 0.1)
    means, _, inv = brute_shrunk_inverse(unit, y, [0, 1], 0.1)
    got = class_distances(model, x * 7.5)  # raw features: the model normalises them
    diff = unit[4] - means[1]
    assert got[4, 1] == pytest.approx(diff @ inv @ diff, rel=1e-9)


@pytest.mark.parametrize(
    ("n", "d", "rho", "offset", "condition"),
    [
        (80, 5, 0.01, 0.0, 1.0),
        (30, 40, 0.1, 0.0, 1.0),  # N < D: the unshrunk covariance is singular
        (90, 6, 1e-3, 1e4, 1e4),  # large common offset and per-dimension scales over 4 decades
    ],
)
def test_out_of_fold_distances_match_brute_force(n, d, rho, offset, condition) -> None:
    scales = np.logspace(0, np.log10(condition), d)
    x, y, ids = make_data(n, d, 3, seed=3, offset=offset, scales=scales)
    stats = stats_of(x, y, ids)
    folds = assign_folds(ids)
    oof = out_of_fold_distances(stats, x, folds, rho)
    want, prior = brute_out_of_fold(x, y, folds, 3, rho)
    assert list(oof.classes) == ["c0", "c1", "c2"]
    np.testing.assert_allclose(oof.distances, want, rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(oof.log_prior, prior, rtol=1e-12)


@pytest.mark.parametrize(("n", "d"), [(100, 6), (25, 30)])
def test_held_out_log_loss_matches_brute_force_per_sample(n, d) -> None:
    x, y, ids = make_data(n, d, 4, seed=4)
    stats = stats_of(x, y, ids)
    folds = assign_folds(ids)
    grid = (1e-3, 0.03, 0.3, 1.0)
    cv = select_shrinkage_by_log_loss(stats, x, [f"c{v}" for v in y], folds, grid)
    want_loss, want_err = [], []
    for rho in grid:
        dist, prior = brute_out_of_fold(x, y, folds, 4, rho)
        losses, errors = [], []
        for i in range(n):
            if not np.isfinite(prior[i, y[i]]):
                continue  # its class is absent from its training folds: not scored
            logits = -dist[i] / 2 + prior[i]
            logits = np.where(np.isfinite(prior[i]), logits, -np.inf)
            losses.append(-(logits[y[i]] - logsumexp(logits)))
            errors.append(int(np.argmax(logits) != y[i]))
        want_loss.append(np.mean(losses))
        want_err.append(np.mean(errors))
    np.testing.assert_allclose(cv.log_loss, want_loss, rtol=1e-7)
    np.testing.assert_allclose(cv.error_rate, want_err)
    assert cv.best == grid[int(np.argmin(want_loss))]


def test_held_out_log_loss_streams_in_any_chunk_order() -> None:
    x, y, ids = make_data(120, 5, 3, seed=5)
    stats = stats_of(x, y, ids)
    folds = assign_folds(ids)
    labels = [f"c{v}" for v in y]
    whole = select_shrinkage_by_log_loss(stats, x, labels, folds)
    acc = HeldOutLogLoss(stats)
    order = np.random.default_rng(0).permutation(120)
    for chunk in np.array_split(order, 7):
        acc.update(x[chunk], [labels[i] for i in chunk], folds[chunk])
    streamed = acc.result()
    np.testing.assert_allclose(streamed.log_loss, whole.log_loss, rtol=1e-10)
    assert streamed.best == whole.best and streamed.n_held_out == 120


def test_log_loss_prefers_shrinkage_when_n_is_below_d() -> None:
    # With N < D a barely shrunk classifier memorises: held-out log-loss must say so.
    x, y, ids = make_data(40, 80, 2, seed=6, spread=0.2)
    cv = select_shrinkage_by_log_loss(
        stats_of(x, y, ids), x, [f"c{v}" for v in y], assign_folds(ids), (1e-6, 0.1, 0.3)
    )
    assert cv.best > 1e-6
    assert cv.log_loss[0] > cv.log_loss[-1]


def brute_label_issues(dist, prior, y, temperature, transition):
    n, k = dist.shape
    prob, suggested, post = np.empty(n), np.empty(n, int), np.empty((n, k))
    for i in range(n):
        logits = -dist[i] / (2 * temperature) + prior[i]
        p = np.exp(logits - logsumexp(logits))
        joint = np.array([p[c] * transition[c, y[i]] for c in range(k)])
        r = joint / joint.sum()
        post[i] = r
        prob[i] = 1 - r[y[i]]
        suggested[i] = int(np.argmax(r))
    return prob, suggested, post


def test_label_issues_match_brute_force_posterior() -> None:
    rng = np.random.default_rng(7)
    n, k = 50, 4
    dist = rng.uniform(0, 30, (n, k))
    prior = np.log(rng.dirichlet(np.ones(k)))
    y = rng.integers(0, k, n)
    transition = rng.dirichlet(np.ones(k) * 0.5, size=k) + np.eye(k) * 3
    transition /= transition.sum(axis=1, keepdims=True)
    noise = LabelNoise(2.5, transition, 0.0, "full")
    got = label_issues(dist, prior, y, noise, threshold=0.4, calibration=None)
    prob, suggested, post = brute_label_issues(dist, np.tile(prior, (n, 1)), y, 2.5, transition)
    np.testing.assert_allclose(got.probability, prob, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(got.suggested, suggested)
    np.testing.assert_allclose(got.true_class_posterior, post, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got.suggested_probability, post[np.arange(n), suggested])
    np.testing.assert_array_equal(got.is_issue, prob >= 0.4)
    np.testing.assert_allclose(got.log_odds, np.log(prob / (1 - prob)), rtol=1e-8)

    # The calibration map: logit(q) = a logit(q_model) + b, other classes rescaled to 1 - q.
    cal = label_issues(dist, prior, y, noise, threshold=0.4, calibration=(0.7, -0.5))
    np.testing.assert_allclose(cal.raw_probability, prob, rtol=1e-10, atol=1e-12)
    for i in range(n):
        logit = 0.7 * np.log(prob[i] / (1 - prob[i])) - 0.5
        q = 1 / (1 + np.exp(-logit))
        assert cal.probability[i] == pytest.approx(q, rel=1e-9)
        want = post[i] * q / prob[i]
        want[y[i]] = 1 - q
        np.testing.assert_allclose(cal.true_class_posterior[i], want, rtol=1e-8, atol=1e-12)
        assert cal.suggested[i] == int(np.argmax(want))
        assert cal.is_issue[i] == (q >= 0.4)
    assert np.all(np.argsort(cal.log_odds) == np.argsort(got.log_odds))


def test_log_odds_rank_where_probability_saturates() -> None:
    # Sharp posteriors: P(given) rounds to 1.0 for both samples, the log-odds still order them.
    lp = np.log(np.array([[1 - 1e-20, 1e-20], [1 - 1e-30, 1e-30]]))
    lp[:, 0] = np.log1p(-np.exp(lp[:, 1]))
    odds = wrong_label_log_odds(lp, np.array([0, 0]))
    assert odds[0] > odds[1]
    assert odds[0] == pytest.approx(np.log(1e-20), rel=1e-9)


def separated_noisy_problem(n: int, rate: float, seed: int):
    x, y, ids = make_data(n, 8, 4, seed=seed)
    rng = np.random.default_rng(seed + 100)
    flipped = np.zeros(n, bool)
    flipped[rng.choice(n, int(rate * n), replace=False)] = True
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + rng.integers(1, 4, flipped.sum())) % 4
    return x, y, noisy, flipped, ids


def test_noise_model_recovers_the_flip_rate_and_is_a_likelihood_optimum() -> None:
    x, y, noisy, flipped, ids = separated_noisy_problem(800, 0.2, seed=8)
    stats = stats_of(x, noisy, ids)
    oof = out_of_fold_distances(stats, x, assign_folds(ids), 0.01)
    yo = np.searchsorted(oof.classes, [f"c{v}" for v in noisy])
    noise = fit_label_noise(oof.distances, oof.log_prior, yo, "uniform")
    assert noise.noise_rate.mean() == pytest.approx(0.2, abs=0.04)

    def log_likelihood(temperature: float, transition: np.ndarray) -> float:
        logits = -oof.distances / (2 * temperature) + oof.log_prior
        p = np.exp(logits - logsumexp(logits, axis=1, keepdims=True))
        return float(np.mean(np.log((p * transition[:, yo].T).sum(axis=1))))

    best = log_likelihood(noise.temperature, noise.transition)
    assert best == pytest.approx(noise.log_likelihood, rel=1e-9)
    for factor in (0.8, 1.25):
        assert log_likelihood(noise.temperature * factor, noise.transition) <= best + 1e-9
    eps = noise.noise_rate[0]
    for other in (eps * 0.7, min(eps * 1.3, 0.9)):
        m = np.full((4, 4), other / 3)
        np.fill_diagonal(m, 1 - other)
        assert log_likelihood(noise.temperature, m) <= best + 1e-9


def test_find_label_issues_ranks_and_calibrates_on_separated_classes() -> None:
    x, y, noisy, flipped, ids = separated_noisy_problem(1000, 0.15, seed=9)
    fit = find_label_issues(
        stats_of(x, noisy, ids), x, [f"c{v}" for v in noisy], assign_folds(ids), 0.01, calibration=None
    )
    from trainer.metrics import auroc

    assert auroc(fit.issues.log_odds, flipped) > 0.97
    # Calibrated in the mean: the expected number of wrong labels is close to the true one.
    assert fit.issues.probability.sum() == pytest.approx(flipped.sum(), rel=0.15)
    suggested = np.array([int(str(c)[1:]) for c in fit.out_of_fold.classes[fit.issues.suggested]])
    assert (suggested[flipped] == y[flipped]).mean() > 0.9
    assert fit.noise.kind == "full" and fit.shrinkage == 0.01


def test_fields_follow_a_permutation_of_the_samples() -> None:
    x, _, noisy, _, ids = separated_noisy_problem(300, 0.1, seed=10)
    labels = [f"c{v}" for v in noisy]
    a = find_label_issues(stats_of(x, noisy, ids), x, labels, assign_folds(ids), 0.03)
    perm = np.random.default_rng(1).permutation(300)
    ids_p = [ids[i] for i in perm]
    b = find_label_issues(
        stats_of(x[perm], noisy[perm], ids_p), x[perm], [labels[i] for i in perm], assign_folds(ids_p), 0.03
    )
    np.testing.assert_allclose(b.issues.probability, a.issues.probability[perm], rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(b.issues.suggested, a.issues.suggested[perm])
    assert b.noise.temperature == pytest.approx(a.noise.temperature, rel=1e-4)


def test_inputs_are_checked() -> None:
    noise = LabelNoise(1.0, np.eye(3), 0.0, "none")
    with pytest.raises(ValueError, match="class indices"):
        label_issues(np.zeros((2, 3)), np.zeros(3), np.array([0, 3]), noise)
    with pytest.raises(ValueError, match="log_prior"):
        label_issues(np.zeros((2, 3)), np.zeros(2), np.array([0, 1]), noise)
    with pytest.raises(ValueError, match="different number of classes"):
        label_issues(np.zeros((2, 2)), np.zeros(2), np.array([0, 1]), noise)
    with pytest.raises(ValueError, match="NaN or inf"):
        fit_label_noise(np.full((2, 3), np.nan), np.zeros(3), np.array([0, 1]))
    assert np.isneginf(log_prior_from_counts(np.array([3, 0]))[1])


def test_soft_fold_moments_match_weighted_brute_force() -> None:
    x, y, ids = make_data(70, 5, 3, seed=11, offset=2.0)
    stats = stats_of(x, y, ids)
    folds = assign_folds(ids)
    # One-hot responsibilities give back the hard-label fold models.
    hard = [m.gaussian() for m in soft_fold_moments(stats, x, folds, np.eye(3)[y])]
    for a, b in zip(hard, fold_gaussians(stats), strict=True):
        np.testing.assert_allclose(a.means, b.means, atol=1e-10)
        np.testing.assert_allclose(a.eigenvalues, b.eigenvalues, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(a.log_prior, b.log_prior)
    r = np.random.default_rng(0).dirichlet(np.ones(3), size=70)  # columns: sorted classes
    axis = [stats.classes.index(f"c{c}") for c in range(3)]  # fold models: stats' class order
    for model in (m.gaussian() for m in soft_fold_moments(stats, x, folds, r)):
        train = folds != model.fold
        xt, rt = x[train], r[train]
        scatter = np.zeros((5, 5))
        for c in range(3):
            mean = (rt[:, c, None] * xt).sum(axis=0) / rt[:, c].sum()
            np.testing.assert_allclose(model.means[axis[c]] + stats.reference, mean, rtol=1e-9)
            for row, w in zip(xt, rt[:, c], strict=True):
                scatter += w * np.outer(row - mean, row - mean)
        want = np.linalg.eigvalsh(scatter / train.sum())
        np.testing.assert_allclose(model.eigenvalues, want, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(model.log_prior[axis], np.log(rt.sum(axis=0) / train.sum()), rtol=1e-10)


def test_kind_none_is_the_temperature_scaled_classifier() -> None:
    rng = np.random.default_rng(12)
    dist, prior, y = rng.uniform(0, 20, (30, 3)), np.log(np.ones(3) / 3), rng.integers(0, 3, 30)
    got = label_issues(dist, prior, y, LabelNoise(3.0, np.eye(3), 0.0, "none"), calibration=None)
    logits = -dist / 6.0
    p = np.exp(logits - logsumexp(logits, axis=1, keepdims=True))
    np.testing.assert_allclose(got.probability, 1 - p[np.arange(30), y], rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(got.suggested, p.argmax(axis=1))


def test_refit_on_soft_labels_keeps_ranking_and_mean_calibration() -> None:
    x, y, noisy, flipped, ids = separated_noisy_problem(1000, 0.15, seed=13)
    fit = find_label_issues(
        stats_of(x, noisy, ids), x, [f"c{v}" for v in noisy], assign_folds(ids), 0.01, refits=1,
        calibration=None,
    )  # fmt: skip
    from trainer.metrics import auroc

    assert auroc(fit.issues.log_odds, flipped) > 0.97
    assert fit.issues.probability.sum() == pytest.approx(flipped.sum(), rel=0.15)


def test_relative_out_of_fold_distances_differ_by_a_constant_per_row() -> None:
    # N < D and a large offset: the linear form must agree with the brute-force distances up to
    # the per-row term it leaves out, and give the same posteriors at any temperature.
    for n, d, rho, offset in ((80, 5, 0.01, 0.0), (30, 40, 0.1, 0.0), (90, 6, 1e-3, 1e3)):
        x, y, ids = make_data(n, d, 3, seed=11, offset=offset)
        stats = stats_of(x, y, ids)
        folds = assign_folds(ids)
        models = fold_gaussians(stats)
        relative = out_of_fold_relative_distances(stats, x, folds, [m.discriminant(rho) for m in models])
        want, prior = brute_out_of_fold(x, y, folds, 3, rho)
        assert relative.relative
        shift = want - relative.distances
        np.testing.assert_allclose(shift, shift[:, :1].repeat(3, axis=1), rtol=1e-7, atol=1e-6 * np.abs(want).max())
        np.testing.assert_allclose(relative.log_prior, prior, rtol=1e-12)
        for temperature in (0.3, 1.0, 40.0):
            np.testing.assert_allclose(
                np.exp(relative.log_posterior(temperature)),
                np.exp(log_posterior(want, prior, temperature)),
                atol=1e-9,
            )


def test_cholesky_and_eigenbasis_discriminants_agree_and_singular_falls_back() -> None:
    x, y, ids = make_data(120, 8, 4, seed=12)
    stats = stats_of(x, y, ids)
    folds = assign_folds(ids)
    onehot = np.eye(4)[y]
    for moments, gaussian in zip(
        soft_fold_moments(stats, x, folds, onehot), fold_gaussians(stats), strict=True
    ):
        for rho in (1e-4, 0.1):
            a, b = moments.discriminant(rho), gaussian.discriminant(rho)
            np.testing.assert_allclose(a.weights, b.weights, rtol=1e-8, atol=1e-10)
            np.testing.assert_allclose(a.offsets, b.offsets, rtol=1e-8)
    # Rank-deficient tied covariance (N < D) at rho = 0: no Cholesky factor; the eigenbasis
    # route clips the round-off eigenvalues and says the covariance is singular.
    x, y, ids = make_data(20, 30, 2, seed=13)
    stats = stats_of(x, y, ids)
    moments = soft_fold_moments(stats, x, assign_folds(ids), np.eye(2)[y])[0]
    with pytest.raises(ValueError, match="singular"):
        moments.discriminant(0.0)


def test_temperature_search_finds_the_maximum_and_breaks_plateau_ties_at_one() -> None:
    x, y, noisy, flipped, ids = separated_noisy_problem(600, 0.2, seed=14)
    stats = stats_of(x, noisy, ids)
    oof = out_of_fold_distances(stats, x, assign_folds(ids), 0.01)
    yo = np.searchsorted(oof.classes, [f"c{v}" for v in noisy])
    log_m = np.log(np.full((4, 4), 0.2 / 3) + np.eye(4) * (0.8 - 0.2 / 3))

    def likelihood(log_t: float) -> float:
        logits = -oof.distances / (2 * np.exp(log_t)) + oof.log_prior
        return float(np.mean(logsumexp(logits + log_m[:, yo].T, axis=1) - logsumexp(logits, axis=1)))

    found, value = fit_log_temperature(oof.distances, oof.log_prior, yo, log_m)
    assert value == pytest.approx(likelihood(found), rel=1e-10)
    grid = np.linspace(np.log(1e-2), np.log(1e5), 2001)
    assert value >= max(likelihood(t) for t in grid) - 1e-9
    # Every posterior saturated (classes 1e4 apart): the likelihood is flat at small T and the
    # search returns T = 1 rather than a bound.
    far = np.where(np.eye(4)[yo] > 0, 0.0, 1e6)
    found, _ = fit_log_temperature(far, np.log(np.full(4, 0.25)), yo, log_m)
    assert found == pytest.approx(0.0, abs=1e-9)


def test_row_blocks_and_threads_do_not_change_any_field(monkeypatch) -> None:
    x, y, noisy, flipped, ids = separated_noisy_problem(500, 0.2, seed=15)
    stats = stats_of(x, noisy, ids)
    labels = [f"c{v}" for v in noisy]
    folds = assign_folds(ids)
    base = find_label_issues(stats, x, labels, folds, 0.01, refits=1)
    monkeypatch.setattr(rows_module, "BLOCK_ROWS", 7)
    monkeypatch.setattr(rows_module, "_threads", lambda: 3)
    small = find_label_issues(stats, x, labels, folds, 0.01, refits=1)
    monkeypatch.setattr(rows_module, "_threads", lambda: 1)
    serial = find_label_issues(stats, x, labels, folds, 0.01, refits=1)
    for other in (small, serial):
        np.testing.assert_allclose(other.issues.log_odds, base.issues.log_odds, rtol=1e-9, atol=1e-9)
        np.testing.assert_array_equal(other.issues.suggested, base.issues.suggested)
        assert other.noise.temperature == pytest.approx(base.noise.temperature, rel=1e-9)
    # Same blocks, threads or not: bit for bit.
    np.testing.assert_array_equal(small.issues.log_odds, serial.issues.log_odds)


def test_warm_started_noise_fit_does_not_lose_likelihood() -> None:
    x, y, noisy, flipped, ids = separated_noisy_problem(600, 0.2, seed=16)
    stats = stats_of(x, noisy, ids)
    oof = out_of_fold_distances(stats, x, assign_folds(ids), 0.01)
    yo = np.searchsorted(oof.classes, [f"c{v}" for v in noisy])
    cold = fit_label_noise(oof.distances, oof.log_prior, yo, "full")
    warm = fit_label_noise(oof.distances, oof.log_prior, yo, "full", initial=cold)
    assert warm.log_likelihood >= cold.log_likelihood - 1e-12
    assert warm.temperature == pytest.approx(cold.temperature, rel=1e-3)
    with pytest.raises(ValueError, match="another kind"):
        fit_label_noise(oof.distances, oof.log_prior, yo, "uniform", initial=cold)
