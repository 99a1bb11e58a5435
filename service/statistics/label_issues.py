"""Label issues from the fitted Gaussians: a calibrated probability that a given label is wrong,
and the most likely true label.

The difficulty scores (``rmd``, ``md_class``, ``md_agnostic``) are untouched; this module ranks
and calibrates with the Gaussian *classifier* they imply. With tied covariance ``Sigma_rho`` and
class frequencies ``pi_k`` the class posterior is

    p_T(k | z) = softmax_k(-MD_k(z) / (2 T) + log pi_k),

with a temperature ``T`` (1 is the plug-in classifier). The labels it is fitted on are noisy, so
the given label ``g`` of a sample with true class ``y`` is modelled as drawn from a transition
matrix ``M[y, g] = P(given g | true y)``. ``T`` and ``M`` are fitted by maximum likelihood of the
*given* labels under **out-of-fold** posteriors (each sample scored by the Gaussians fitted on
the other folds, from the per-fold sufficient statistics), EM for ``M``: no true label is
needed. The posterior of the true class is then

    r(y | z, g) ∝ p_T(y | z) M[y, g],

and ``label_issue_probability = 1 - r(g | z, g)``, ``suggested_label = argmax_y r(y | z, g)``
with probability ``r(suggested | z, g)`` (the given label itself when it is probably right).
docs/evidence.md gives the measurements behind the defaults (ranking, shrinkage, threshold) and a
reliability table.

Shapes: N samples, K classes, D features. Class axes follow ``GaussianModel.classes`` (sorted).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from scipy.linalg import cho_factor, cho_solve, eigh, solve_triangular
from scipy.special import expit, log_expit

from service.statistics.gaussian import GaussianModel, normalize_features
from service.statistics.rows import map_row_blocks
from service.statistics.selection import (
    FoldDiscriminant,
    FoldGaussian,
    distances_in_eigenbasis,
    fold_gaussians,
    log_posterior,
    logsumexp,
    shrunk_eigenvalues,
)
from service.statistics.shrinkage import shrink
from service.statistics.sufficient import SufficientStatistics

# A label is flagged when it is more likely wrong than right.
DEFAULT_THRESHOLD = 0.5
# Platt correction of the model's log-odds, ``logit(q) = a * logit(q_model) + b``: the EM
# calibration above needs no true label but measured over-confident in the middle (samples given
# 0.85 were 55-74% wrong). Fitted once, on the development seeds of
# benchmarks/label_issues_evidence.py (seed 100; N = 1,000/3,000/10,000; uniform and
# class-conditional flips at 5/10/20%; reliability bins, 14 settings), and checked on the
# disjoint reported seeds (docs/evidence.md, section 5). A constant of the method measured on one
# dataset and encoder, not refitted per dataset: pass ``calibration=None`` for the model's own.
DEFAULT_CALIBRATION: tuple[float, float] = (0.69, -0.61)
# Bounds of the fitted temperature (log scale): the posterior of a near-unshrunk fit at N ~ D
# needs T of several hundred to be calibrated, a heavily shrunk one may need T < 1.
LOG_TEMPERATURE_BOUNDS = (np.log(1e-2), np.log(1e5))
# Pseudo-count added to every cell of the transition counts in the M-step: keeps rows of rare
# classes away from exact zeros (a zero would make some relabelling impossible).
TRANSITION_PSEUDO_COUNT = 0.1
# Rows the noise model is fitted on, at most (find_label_issues).
NOISE_SAMPLE_ROWS = 20_000
# Rows the label-issue rho is chosen on, at most (held-out log-loss over the grid, 13 GEMMs of
# rows x D x K): every row up to the largest N of the evidence benchmark (10,000).
SELECTION_SAMPLE_ROWS = 10_000
NoiseKind = Literal["full", "uniform", "none"]


def log_prior_from_counts(class_counts: np.ndarray) -> np.ndarray:
    """(K,) ``log(n_k / N)`` (``-inf`` for an empty class)."""
    counts = np.asarray(class_counts, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.log(counts / counts.sum())


def class_distances(model: GaussianModel, features: np.ndarray, batch: int = 8192) -> np.ndarray:
    """(N, K) squared Mahalanobis distances ``MD_k(z_i)`` to every class mean under the model's
    shrunk tied covariance (the same quantity as ``md_class`` for the given class), for (N, D)
    ``features`` in the space the model was fitted on (normalised here if the model is)."""
    x = np.asarray(features)
    if x.ndim != 2 or x.shape[1] != model.dim:
        raise ValueError(f"features must have shape (n, {model.dim}), got {x.shape}")
    lower = np.linalg.cholesky(shrink(model.covariance, model.shrinkage))
    whiten = solve_triangular(lower, np.eye(model.dim), lower=True)
    means = (model.means - model.mean_agnostic) @ whiten.T
    mean_norms = np.einsum("kd,kd->k", means, means)
    out = np.empty((x.shape[0], means.shape[0]))
    for start in range(0, x.shape[0], batch):
        z = np.asarray(x[start : start + batch], dtype=np.float64)
        if model.normalized:
            z = normalize_features(z)
        w = (z - model.mean_agnostic) @ whiten.T
        d = w @ means.T
        d *= -2.0
        d += mean_norms[None, :]
        d += np.einsum("nd,nd->n", w, w)[:, None]
        out[start : start + batch] = np.maximum(d, 0.0)
    return out


@dataclass(frozen=True)
class OutOfFold:
    """Out-of-fold class distances: each sample against the Gaussians of the other folds.

    Attributes:
        classes: (K,) class labels, sorted (as ``GaussianModel.classes``).
        distances: (N, K) ``MD_k`` of each sample under its out-of-fold model (up to a constant
            per row where ``relative``).
        log_prior: (N, K) log class frequencies of each sample's training folds.
    """

    classes: np.ndarray
    distances: np.ndarray
    log_prior: np.ndarray
    # True: ``distances`` are shifted by a constant per row (FoldDiscriminant.relative_distances),
    # which changes no posterior, calibration or field computed from them.
    relative: bool = False

    def log_posterior(self, temperature: float = 1.0) -> np.ndarray:
        """(N, K) ``log p_T(k | z_i)`` under the out-of-fold models."""
        return log_posterior(self.distances, self.log_prior, temperature)


def out_of_fold_distances(
    stats: SufficientStatistics,
    features: np.ndarray,
    folds: np.ndarray,
    rho: float,
    fold_models: Sequence[FoldGaussian] | None = None,
) -> OutOfFold:
    """Distances of every sample to the class means of the Gaussians fitted on the other folds
    (tied covariance shrunk by ``rho``).

    Parameters
    ----------
    stats : the per-fold statistics the samples were accumulated into.
    features : (N, D) the same samples, in the space of ``stats`` (already L2-normalised if the
        fit normalises).
    folds : (N,) each sample's fold (``assign_folds`` of its ID).
    rho : shrinkage in (0, 1] (0 only if every fold's covariance is non-singular).
    fold_models : ``fold_gaussians(stats)`` if already computed (e.g. for the shrinkage
        selection); computed here otherwise.
    """
    return out_of_fold_distances_grid(stats, features, folds, [rho], fold_models)[0]


def out_of_fold_distances_grid(
    stats: SufficientStatistics,
    features: np.ndarray,
    folds: np.ndarray,
    rhos: Sequence[float],
    fold_models: Sequence[FoldGaussian] | None = None,
) -> list[OutOfFold]:
    """:func:`out_of_fold_distances` for several rhos, projecting each sample once (the
    ``D^2`` part); one :class:`OutOfFold` per rho, in order."""
    x = np.asarray(features)
    folds = np.asarray(folds)
    if x.ndim != 2 or x.shape[1] != stats.dim or folds.shape != (x.shape[0],):
        raise ValueError("features must be (N, D) with D = stats.dim and folds (N,)")
    names, keep = _sorted_present_classes(stats)
    # Filled fold by fold; ``covered`` says which rows got a model (np.full(nan) of three
    # N x K arrays was a measurable share of the stage at N = 100,000).
    distances = np.empty((len(rhos), x.shape[0], keep.size))
    log_prior = np.empty((x.shape[0], keep.size))
    covered = np.zeros(x.shape[0], dtype=bool)
    for model in fold_gaussians(stats) if fold_models is None else fold_models:
        rows = np.flatnonzero(folds == model.fold)
        if rows.size == 0:
            continue
        # float64 per fold, not for the whole matrix at once (N x D x 8 bytes more).
        u, m = model.project(np.asarray(x[rows], dtype=np.float64) - stats.reference)
        projected_means = m[keep]
        for i, rho in enumerate(rhos):
            lam = shrunk_eigenvalues(model.eigenvalues, rho)
            if not np.all(lam > 0):
                raise ValueError(f"shrinkage {rho:g} leaves fold {model.fold}'s covariance singular")
            distances[i, rows] = distances_in_eigenbasis(u, projected_means, lam)
        log_prior[rows] = model.log_prior[keep]
        covered[rows] = True
    _check_covered(covered)
    return [OutOfFold(names[keep], distances[i], log_prior) for i in range(len(rhos))]


def out_of_fold_relative_distances(
    stats: SufficientStatistics,
    features: np.ndarray,
    folds: np.ndarray,
    discriminants: Sequence[FoldDiscriminant],
) -> OutOfFold:
    """:func:`out_of_fold_distances` up to a constant per row (``relative=True``), from each
    fold model's linear form at one rho (``FoldGaussian.discriminant`` or
    ``FoldMoments.discriminant``): N x D x K flops instead of N x D^2 + N x D x K. Everything
    the label-issue model computes from class distances is a softmax over classes, unchanged by
    the shift."""
    x = np.asarray(features)
    folds = np.asarray(folds)
    if x.ndim != 2 or x.shape[1] != stats.dim or folds.shape != (x.shape[0],):
        raise ValueError("features must be (N, D) with D = stats.dim and folds (N,)")
    names, keep = _sorted_present_classes(stats)
    distances = np.empty((x.shape[0], keep.size))
    log_prior = np.empty((x.shape[0], keep.size))
    covered = np.zeros(x.shape[0], dtype=bool)
    by_fold = {m.fold: m for m in discriminants}
    for fold, rows, centred in _fold_chunks(x, folds, stats.reference):
        model = by_fold.get(fold)
        if model is None:
            continue
        distances[rows] = model.relative_distances(centred)[:, keep]
        log_prior[rows] = model.log_prior[keep]
        covered[rows] = True
    _check_covered(covered)
    return OutOfFold(names[keep], distances, log_prior, relative=True)


def _check_covered(covered: np.ndarray) -> None:
    if not covered.all():
        raise ValueError(
            "out-of-fold distances undefined for some samples: their fold has no model (a fold "
            "outside stats.n_folds, or fewer than 2 samples outside it)"
        )


def _fold_chunks(
    features: np.ndarray, folds: np.ndarray, reference: np.ndarray, chunk: int = 4096
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """``(fold, rows, centred)`` for each fold's rows within consecutive chunks of rows:
    ``centred`` is ``features[rows] - reference`` in float64. The float64 copy is made a chunk
    at a time, in cache, not as a second N x D matrix gathered fold by fold."""
    for start in range(0, features.shape[0], chunk):
        stop = min(start + chunk, features.shape[0])
        centred = np.asarray(features[start:stop], dtype=np.float64) - reference
        local_folds = folds[start:stop]
        for fold in np.unique(local_folds):
            local = np.flatnonzero(local_folds == fold)
            yield int(fold), start + local, centred[local]


def _scatter_classes(values: np.ndarray, keep: np.ndarray, k_all: int) -> np.ndarray:
    """(F, len(keep), ...) per sorted present class -> (F, k_all, ...) in ``stats`` order."""
    out = np.zeros((values.shape[0], k_all, *values.shape[2:]))
    out[:, keep] = values
    return out


def _sorted_present_classes(stats: SufficientStatistics) -> tuple[np.ndarray, np.ndarray]:
    """Class names and the indices of the classes with samples, in sorted-name order."""
    present = stats.counts.sum(axis=0) > 0
    names = np.asarray(stats.classes, dtype=np.str_)
    return names, np.flatnonzero(present)[np.argsort(names[present], kind="stable")]


@dataclass(frozen=True)
class LabelNoise:
    """Fitted calibration: temperature and label transition matrix.

    Attributes:
        temperature: ``T`` of ``p_T(k | z)``.
        transition: (K, K) ``M[y, g] = P(given label g | true class y)``, rows sum to 1.
        log_likelihood: mean log-likelihood of the given labels at the optimum.
        kind: "full" (any M), "uniform" (``1 - eps`` on the diagonal, ``eps / (K - 1)`` off it)
            or "none" (M = I: the plain temperature-scaled classifier).
    """

    temperature: float
    transition: np.ndarray
    log_likelihood: float
    kind: NoiseKind

    @property
    def noise_rate(self) -> np.ndarray:
        """(K,) estimated share of wrong labels per true class, ``1 - M[y, y]``."""
        return 1.0 - np.diag(self.transition)


def fit_label_noise(
    distances: np.ndarray,
    log_prior: np.ndarray,
    labels: np.ndarray,
    kind: NoiseKind = "full",
    max_rounds: int = 100,
    tol: float = 1e-8,
    initial: LabelNoise | None = None,
) -> LabelNoise:
    """Maximum-likelihood ``T`` and ``M`` for the given labels under ``p_T(y | z) M[y, g]``, by
    coordinate ascent: a safeguarded Newton search on ``log T`` with ``M`` fixed
    (:func:`fit_log_temperature`), then EM steps on ``M`` with ``T`` fixed, until the mean
    log-likelihood gains less than ``tol``. Each step cannot lower the likelihood (for "full",
    the M-step adds ``TRANSITION_PSEUDO_COUNT``).

    Parameters
    ----------
    distances : (N, K) class distances, out-of-fold (:func:`out_of_fold_distances`, either
        form); in-sample distances would fit an over-confident T.
    log_prior : (K,) or (N, K) log class priors of the model(s) behind ``distances``.
    labels : (N,) given labels as class indices into the K columns.
    kind : transition model, see :class:`LabelNoise`.
    initial : a fit to start from (same K and kind), e.g. the previous round's of an EM over
        the Gaussians; None starts from M with 10% uniform noise and a scan over T.
    """
    d, prior, y = _validated(distances, log_prior, labels)
    k = d.shape[1]
    if initial is not None:
        if initial.kind != kind or initial.transition.shape != (k, k):
            raise ValueError("the initial noise model has another kind or number of classes")
        transition = initial.transition
    elif kind == "none":
        transition = np.eye(k)
    elif kind in ("full", "uniform"):
        transition = _uniform_transition(k, 0.1)
    else:
        raise ValueError(f"kind must be 'full', 'uniform' or 'none', got {kind!r}")
    # The search reads distances shifted to a zero minimum per row: the same posteriors, and
    # smaller numbers in the variance terms of its second derivative.
    shifted = d - d.min(axis=1, keepdims=True)
    log_t = 0.0 if initial is None else float(np.log(initial.temperature))
    previous, ll = -np.inf, -np.inf
    for round_ in range(max_rounds):
        with np.errstate(divide="ignore"):
            log_m = np.log(transition)
        scan = round_ == 0 and initial is None
        found, found_ll = fit_log_temperature(shifted, prior, y, log_m, start=None if scan else log_t)
        if found_ll >= ll:  # the search is local: keep the old T if it found nothing better
            log_t, ll = found, found_ll
        if kind == "none":
            break
        log_p = log_posterior(d, prior, float(np.exp(log_t)))
        for _ in range(10):
            updated = _m_step(log_p, transition, y, kind)
            settled = np.max(np.abs(updated - transition)) < 1e-12
            transition = updated
            if settled:  # a fixed point (to round-off): more steps would change nothing
                break
        with np.errstate(divide="ignore"):
            ll = _mean_log_likelihood(log_p, np.log(transition), y)
        if ll - previous < tol:
            break
        previous = ll
    return LabelNoise(float(np.exp(log_t)), transition, float(ll), kind)


def fit_log_temperature(
    distances: np.ndarray,
    log_prior: np.ndarray,
    labels: np.ndarray,
    log_transition: np.ndarray,
    start: float | None = None,
    xtol: float = 1e-7,
    gtol: float = 1e-12,
    max_steps: int = 100,
) -> tuple[float, float]:
    """``(log T, mean log-likelihood)`` maximising ``L(T) = mean_i log sum_y p_T(y | z_i)
    M[y, g_i]`` over ``LOG_TEMPERATURE_BOUNDS`` for a fixed ``M``, from ``start`` (None: from
    the best point of a scan with one point per decade of T).

    With ``beta = 1 / T``, ``p`` the posterior and ``r`` its reweighting by ``M[., g_i]``:
    ``dL/dbeta = mean(E_p[d] - E_r[d]) / 2`` and ``d2L/dbeta2 = mean(Var_r[d] - Var_p[d]) / 4``,
    one pass over the (N, K) array per step. Newton steps on ``log T`` inside a bracket that the
    derivative's sign keeps shrinking, bisection where Newton would leave it or the curvature is
    not negative; the best point seen is returned (a local search, like any on this function).
    """
    y = np.asarray(labels, dtype=np.int64)
    n = distances.shape[0]
    given_log_m = log_transition.T[y]  # (N, K): row i is log M[., g_i]
    squared = distances * distances

    def evaluate(log_t: float) -> tuple[float, float, float]:
        beta = float(np.exp(-log_t))

        def block(rows: slice) -> np.ndarray:
            a = distances[rows] * (-0.5 * beta)
            a += log_prior[rows] if log_prior.ndim == 2 else log_prior[None, :]
            b = a + given_log_m[rows]
            out = np.empty((2, 3))
            for j, logits in enumerate((a, b)):
                top = logits.max(axis=1, keepdims=True)
                top = np.where(np.isfinite(top), top, 0.0)
                e = np.exp(logits - top)
                total = e.sum(axis=1)
                with np.errstate(divide="ignore", invalid="ignore"):
                    mean = np.einsum("nk,nk->n", e, distances[rows]) / total
                    var = np.einsum("nk,nk->n", e, squared[rows]) / total - mean * mean
                    lse = np.log(total) + top[:, 0]
                out[j] = lse.sum(), mean.sum(), var.sum()
            return out

        a_sums, b_sums = np.sum(map_row_blocks(block, n), axis=0)
        value = (b_sums[0] - a_sums[0]) / n
        grad_beta = (a_sums[1] - b_sums[1]) / (2 * n)
        curv_beta = (b_sums[2] - a_sums[2]) / (4 * n)
        # Chain rule to s = log T (beta = exp(-s)).
        grad = -beta * grad_beta
        curv = beta * beta * curv_beta + beta * grad_beta
        return value, grad, curv

    lo, hi = LOG_TEMPERATURE_BOUNDS
    if start is None:
        # A coarse scan first (one point per decade of T), so that a plateau (posteriors
        # saturated at small T, where the derivative vanishes) does not stop the search far from
        # the maximum; the bracket is then the scan's neighbours of its best point.
        grid = np.linspace(lo, hi, int(round((hi - lo) / np.log(10.0))) + 1)
        scanned = [evaluate(float(t)) for t in grid]
        values = np.array([v[0] for v in scanned])
        # Ties (a plateau, to round-off) go to the point nearest T = 1, the plug-in classifier.
        ties = np.flatnonzero(values >= values.max() - 1e-12 * (1.0 + abs(values.max())))
        i = int(ties[np.argmin(np.abs(grid[ties]))])
        s = float(grid[i])
        value, grad, curv = scanned[i]
        lo, hi = float(grid[max(i - 1, 0)]), float(grid[min(i + 1, grid.size - 1)])
    else:
        s = float(np.clip(start, lo, hi))
        value, grad, curv = evaluate(s)
    if not np.isfinite(value):
        return s, value  # some given label is impossible under every T
    best = (value, s)
    for _ in range(max_steps):
        # The maximum lies where the derivative turns from + to -: shrink the bracket.
        if grad > 0:
            lo = s
        else:
            hi = s
        # Stop when the bracket is closed or the function is flat to round-off around s.
        if hi - lo < xtol or abs(grad) * (hi - lo) < gtol:
            break
        step = -grad / curv if curv < 0 and np.isfinite(curv) else np.nan
        candidate = s + step
        if not (lo < candidate < hi):
            candidate = 0.5 * (lo + hi)
        if abs(candidate - s) < xtol:
            break
        s = candidate
        value, grad, curv = evaluate(s)
        if value > best[0]:
            best = (value, s)
    return best[1], float(best[0])


def wrong_label_log_odds(log_probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(N,) ``log(P(not g) / P(g))`` from (N, K) log class probabilities and (N,) given class
    indices ``g``: the same order as ``1 - P(g)`` but without float saturation (``P(g)`` rounds
    to exactly 1 for most samples of a sharp posterior, which would tie them all)."""
    lp = np.asarray(log_probabilities, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    rows = np.arange(y.shape[0])
    others = lp.copy()
    others[rows, y] = -np.inf
    return logsumexp(others, axis=1) - lp[rows, y]


@dataclass(frozen=True)
class LabelIssues:
    """Per-sample label-issue fields.

    Attributes:
        probability: (N,) ``P(given label is wrong | z, given label)``, calibrated.
        raw_probability: (N,) the same under the fitted model before the calibration map.
        log_odds: (N,) ``log(probability / (1 - probability))`` computed without saturation:
            the ranking key (most likely issue first), also among probabilities that round to
            0 or 1.
        suggested: (N,) class index of the most likely true class.
        suggested_probability: (N,) its posterior probability.
        true_class_posterior: (N, K) ``r(y | z, g)``.
        is_issue: (N,) ``probability >= threshold``.
        threshold: the flagging threshold used.
    """

    probability: np.ndarray
    raw_probability: np.ndarray
    log_odds: np.ndarray
    suggested: np.ndarray
    suggested_probability: np.ndarray
    true_class_posterior: np.ndarray
    is_issue: np.ndarray
    threshold: float


def label_issues(
    distances: np.ndarray,
    log_prior: np.ndarray,
    labels: np.ndarray,
    noise: LabelNoise,
    threshold: float = DEFAULT_THRESHOLD,
    calibration: tuple[float, float] | None = DEFAULT_CALIBRATION,
) -> LabelIssues:
    """Label-issue fields from (N, K) class ``distances`` (out-of-fold, as fitted), their
    (K,) or (N, K) ``log_prior``, (N,) given ``labels`` (class indices) and a fitted
    :class:`LabelNoise`.

    ``calibration`` ``(a, b)`` maps the model's log-odds ``l`` of a wrong label to ``a l + b``
    (monotone: the ranking is unchanged); the other classes' posteriors are rescaled to the new
    total, so ``true_class_posterior`` rows still sum to 1 and ``suggested_probability`` is on
    the same scale as ``probability``."""
    d, prior, y = _validated(distances, log_prior, labels)
    if noise.transition.shape != (d.shape[1], d.shape[1]):
        raise ValueError("the noise model was fitted for a different number of classes")
    if not 0.0 < threshold <= 1.0:
        raise ValueError("threshold must be in (0, 1]")
    if calibration is not None and not calibration[0] > 0:
        raise ValueError("the calibration slope must be positive (the map must be monotone)")
    n = y.shape[0]
    given_log_m = None
    if noise.kind != "none":
        # kind "none" (M = I) would say no label is ever wrong; its fields are those of the
        # temperature-scaled classifier itself, 1 - p_T(g | z).
        with np.errstate(divide="ignore"):
            given_log_m = np.log(noise.transition).T  # row g is log M[., g]
    r = np.empty(d.shape)
    raw_log_odds = np.empty(n)
    log_odds = np.empty(n)

    def block(rows: slice) -> None:
        # r(y | z, g) ∝ p_T(y | z) M[y, g]: one normalisation of the joint logits.
        log_r = d[rows] * (-0.5 / noise.temperature)
        log_r += prior[rows] if prior.ndim == 2 else prior[None, :]
        if given_log_m is not None:
            log_r += given_log_m[y[rows]]
        log_r -= logsumexp(log_r, axis=1, keepdims=True)
        g = y[rows]
        at = np.arange(g.shape[0])
        raw = wrong_label_log_odds(log_r, g)
        raw_log_odds[rows] = raw
        if calibration is None:
            log_odds[rows] = raw
        else:
            slope, intercept = calibration
            calibrated = slope * raw + intercept
            log_odds[rows] = calibrated
            # log P(wrong) of the model = logsumexp over the other classes = log_r(g) + raw.
            log_r += (log_expit(calibrated) - (log_r[at, g] + raw))[:, None]
            log_r[at, g] = log_expit(-calibrated)
        r[rows] = np.exp(log_r)

    map_row_blocks(block, n)
    suggested = r.argmax(axis=1)
    probability = expit(log_odds)
    return LabelIssues(
        probability=probability,
        raw_probability=expit(raw_log_odds),
        log_odds=log_odds,
        suggested=suggested,
        suggested_probability=r[np.arange(n), suggested],
        true_class_posterior=r,
        is_issue=probability >= threshold,
        threshold=float(threshold),
    )


@dataclass(frozen=True)
class FoldMoments:
    """Class means, priors and tied covariance fitted on every fold but ``fold`` (no
    eigendecomposition: at one rho a Cholesky factor is all the posterior needs).

    Attributes:
        fold: the held-out fold.
        means: (K, D) class means centred on ``stats.reference`` (absent classes: the mean).
        log_prior: (K,) log class weights (``-inf`` for classes without weight).
        tied: (D, D) the tied within-class covariance (divided by the training weight).
    """

    fold: int
    means: np.ndarray
    log_prior: np.ndarray
    tied: np.ndarray

    def discriminant(self, rho: float) -> FoldDiscriminant:
        """The linear form of the class posterior under ``Sigma_rho = shrink(tied, rho)``:
        through a Cholesky factor, or through the eigendecomposition (round-off negative
        eigenvalues clipped, as for every rho of a grid) where ``Sigma_rho`` is too close to
        singular for one (N < D with a small rho)."""
        try:
            factor = cho_factor(shrink(self.tied, rho), lower=True)
        except np.linalg.LinAlgError:
            return self.gaussian().discriminant(rho)
        weights = cho_solve(factor, self.means.T)
        return FoldDiscriminant(self.fold, weights, np.einsum("kd,dk->k", self.means, weights), self.log_prior)

    def gaussian(self) -> FoldGaussian:
        """The same model with its eigendecomposition (every rho at once)."""
        eigenvalues, eigenvectors = eigh(self.tied, driver="evr")
        return FoldGaussian(self.fold, self.means, self.log_prior, eigenvalues, eigenvectors)


def soft_fold_moments(
    stats: SufficientStatistics,
    features: np.ndarray,
    folds: np.ndarray,
    responsibilities: np.ndarray,
) -> list[FoldMoments]:
    """Fold models refitted on soft labels: class ``k`` gets weight ``r_ik`` of sample ``i``.

    The M-step of the generative model behind :func:`label_issues` (latent true class, Gaussian
    features, noisy given label): with soft labels the tied within-class scatter is
    ``sum_i z_i z_i^T - sum_k s_k s_k^T / n_k`` (``s_k = sum_i r_ik z_i``, ``n_k = sum_i r_ik``), so
    the label-free second moments of ``stats`` are reused and only ``r^T Z`` per fold is new.

    Parameters
    ----------
    stats : per-fold statistics of exactly these samples.
    features : (N, D) the samples in the space of ``stats``.
    folds : (N,) their folds.
    responsibilities : (N, K) soft labels over the sorted classes (``OutOfFold.classes``),
        e.g. ``LabelIssues.true_class_posterior``; rows sum to 1.
    """
    x = np.asarray(features)
    folds = np.asarray(folds)
    _, keep = _sorted_present_classes(stats)
    soft_counts = np.zeros((stats.n_folds, keep.size))
    soft_sums = np.zeros((stats.n_folds, keep.size, stats.dim))
    for fold, rows, centred in _fold_chunks(x, folds, stats.reference):
        r = np.asarray(responsibilities[rows], dtype=np.float64)
        soft_counts[fold] += r.sum(axis=0)
        soft_sums[fold] += r.T @ centred
    # Back to the classes' order in ``stats``; absent classes keep zero weight.
    k_all = len(stats.classes)
    soft_counts = _scatter_classes(soft_counts, keep, k_all)
    soft_sums = _scatter_classes(soft_sums, keep, k_all)
    out = []
    for f in range(stats.n_folds):
        train = np.arange(stats.n_folds) != f
        counts = soft_counts[train].sum(axis=0)
        n_train = counts.sum()
        if not (folds == f).any() or n_train < 2:
            continue
        sums = soft_sums[train].sum(axis=0)
        second = stats.second_moments[train].sum(axis=0)
        live = counts > 1e-12
        means = np.empty_like(sums)
        means[live] = sums[live] / counts[live, None]
        means[~live] = sums.sum(axis=0) / n_train
        tied = (second - (sums[live].T / counts[live]) @ sums[live]) / n_train
        with np.errstate(divide="ignore"):
            log_prior = np.where(live, np.log(np.maximum(counts, 1e-300) / n_train), -np.inf)
        out.append(FoldMoments(f, means, log_prior, (tied + tied.T) / 2))
    return out


@dataclass(frozen=True)
class LabelIssueFit:
    """Everything :func:`find_label_issues` computed: the fields, the calibration and the
    out-of-fold distances (classes in ``out_of_fold.classes`` order)."""

    issues: LabelIssues
    noise: LabelNoise
    out_of_fold: OutOfFold
    shrinkage: float


def find_label_issues(
    stats: SufficientStatistics,
    features: np.ndarray,
    labels: Sequence[str],
    folds: np.ndarray,
    shrinkage: float,
    kind: NoiseKind = "full",
    threshold: float = DEFAULT_THRESHOLD,
    refits: int = 0,
    fold_models: Sequence[FoldGaussian] | None = None,
    calibration: tuple[float, float] | None = DEFAULT_CALIBRATION,
    out_of_fold: OutOfFold | None = None,
    noise_sample: int | None = NOISE_SAMPLE_ROWS,
    on_step: Callable[[], None] | None = None,
) -> LabelIssueFit:
    """The whole estimator on arrays: out-of-fold distances at ``shrinkage``, the noise model
    fitted on them, and the per-sample fields.

    Parameters
    ----------
    stats : per-fold statistics of exactly these samples.
    features : (N, D) the samples, in the space of ``stats``.
    labels : (N,) given labels (strings, as in ``stats.classes``).
    folds : (N,) folds of the samples (``assign_folds`` of their IDs).
    shrinkage : rho of the tied covariance, e.g. ``select_shrinkage_by_log_loss(...).best``.
    kind, threshold : see :func:`fit_label_noise`, :func:`label_issues`.
    refits : EM rounds that refit the fold Gaussians on the soft true labels
        (:func:`soft_fold_moments`) before the final noise fit; 0 uses the given labels.
    fold_models : ``fold_gaussians(stats)`` if already computed.
    calibration : see :func:`label_issues`.
    out_of_fold : ``out_of_fold_distances(stats, features, folds, shrinkage)`` (or its
        ``relative`` form) if already computed.
    noise_sample : the noise model (T and M: K^2 + 1 numbers) is fitted on at most this many
        samples, evenly spaced in row order, then applied to all; its iterative fit is
        O(rounds x N x K) and dominated the fit job at N = 100,000 (None: every sample).
    on_step : called after each step (out-of-fold posteriors, noise model, per refit round),
        e.g. to report progress or to raise and stop between steps.
    """
    step = on_step or (lambda: None)
    oof = out_of_fold
    if oof is None:
        models = fold_gaussians(stats) if fold_models is None else fold_models
        oof = out_of_fold_relative_distances(stats, features, folds, [m.discriminant(shrinkage) for m in models])
    step()
    index = {c: i for i, c in enumerate(oof.classes)}
    y = np.fromiter((index[str(c)] for c in labels), dtype=np.int64, count=len(labels))
    rows = noise_rows(y.shape[0], noise_sample)
    noise = fit_label_noise(oof.distances[rows], oof.log_prior[rows], y[rows], kind)
    step()
    for _ in range(refits):
        # Soft labels from the model's own posterior (uncalibrated: the EM's E-step).
        soft = label_issues(oof.distances, oof.log_prior, y, noise, threshold, None)
        moments = soft_fold_moments(stats, features, folds, soft.true_class_posterior)
        oof = out_of_fold_relative_distances(stats, features, folds, [m.discriminant(shrinkage) for m in moments])
        step()
        # EM goes on from where it was (the soft labels came from this noise model).
        noise = fit_label_noise(oof.distances[rows], oof.log_prior[rows], y[rows], kind, initial=noise)
        step()
    issues = label_issues(oof.distances, oof.log_prior, y, noise, threshold, calibration)
    return LabelIssueFit(issues, noise, oof, float(shrinkage))


def noise_rows(n: int, sample: int | None) -> np.ndarray | slice:
    """Evenly spaced rows, at most ``sample`` of ``n`` (all rows when ``sample`` is None)."""
    if sample is None or n <= sample:
        return slice(None)
    return np.unique(np.linspace(0, n - 1, sample).astype(np.int64))


def _uniform_transition(k: int, eps: float) -> np.ndarray:
    transition = np.full((k, k), eps / max(k - 1, 1))
    np.fill_diagonal(transition, 1.0 - eps)
    return transition


def _mean_log_likelihood(log_p: np.ndarray, log_m: np.ndarray, y: np.ndarray) -> float:
    """Mean over samples of ``log sum_y p(y | z_i) M[y, g_i]``."""
    given_log_m = log_m.T  # row g is log M[., g]

    def block(rows: slice) -> float:
        return float(logsumexp(log_p[rows] + given_log_m[y[rows]], axis=1).sum())

    return float(np.sum(map_row_blocks(block, y.shape[0])) / y.shape[0])


def _m_step(log_p: np.ndarray, transition: np.ndarray, y: np.ndarray, kind: NoiseKind) -> np.ndarray:
    """One EM update of M: responsibilities r_i(y) ∝ p(y | z_i) M[y, g_i], then counts."""
    k = transition.shape[0]
    with np.errstate(divide="ignore"):
        given_log_m = np.log(transition).T

    def block(rows: slice) -> np.ndarray:
        joint = log_p[rows] + given_log_m[y[rows]]
        r = np.exp(joint - logsumexp(joint, axis=1, keepdims=True))
        if kind == "uniform":
            return np.array(r[np.arange(r.shape[0]), y[rows]].sum())
        # counts[c, g] = sum over samples given g of r_i(c): K bincounts, O(n K) (np.add.at is
        # an unbuffered loop; a one-hot GEMM here would run BLAS inside the block threads,
        # which OpenBLAS serialises: 20x slower, measured).
        return np.stack([np.bincount(y[rows], weights=r[:, c], minlength=k) for c in range(k)])

    parts = map_row_blocks(block, y.shape[0])
    if kind == "uniform":
        eps = float(np.clip(1.0 - np.sum(parts) / y.shape[0], 1e-6, 1.0 - 1e-6))
        return _uniform_transition(k, eps)
    counts = np.sum(parts, axis=0) + TRANSITION_PSEUDO_COUNT
    return counts / counts.sum(axis=1, keepdims=True)


def _validated(distances, log_prior, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = np.asarray(distances, dtype=np.float64)
    prior = np.asarray(log_prior, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if d.ndim != 2 or y.shape != (d.shape[0],):
        raise ValueError(f"distances must be (N, K) and labels (N,), got {d.shape} and {y.shape}")
    if prior.shape not in ((d.shape[1],), d.shape):
        raise ValueError(f"log_prior must be (K,) or (N, K), got {prior.shape}")
    if y.size and (y.min() < 0 or y.max() >= d.shape[1]):
        raise ValueError("labels must be class indices in [0, K)")
    if not np.isfinite(d).all():
        raise ValueError("distances contain NaN or inf")
    return d, prior, y

