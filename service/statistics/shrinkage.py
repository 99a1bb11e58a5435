"""Shrinkage of a covariance towards a scaled identity, chosen by cross-validated likelihood.

``Sigma_rho = (1 - rho) * Sigma + rho * (trace(Sigma) / D) * I``. With "auto", rho is the grid
point with the highest 5-fold held-out Gaussian log-likelihood. Every held-out likelihood is a
function of per-fold sufficient statistics, and with the eigendecomposition of the training
covariance the whole grid costs O(D) per point.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from scipy.linalg import eigh

from service.statistics.sufficient import SufficientStatistics

if TYPE_CHECKING:  # selection imports this module's grid
    from service.statistics.selection import FoldGaussian

SHRINKAGE_GRID: tuple[float, ...] = (
    1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0,
)  # fmt: skip


def shrink(covariance: np.ndarray, rho: float) -> np.ndarray:
    """``(1 - rho) * Sigma + rho * mean(diag(Sigma)) * I``."""
    d = covariance.shape[0]
    target = np.trace(covariance) / d
    out = (1.0 - rho) * covariance
    out[np.diag_indices(d)] += rho * target
    return out


@dataclass(frozen=True)
class CrossValidation:
    """Held-out log-likelihood (summed over folds) of each grid point, for both covariances."""

    grid: tuple[float, ...]
    log_likelihood_tied: np.ndarray
    log_likelihood_agnostic: np.ndarray

    @property
    def best_tied(self) -> float:
        return self.grid[int(np.argmax(self.log_likelihood_tied))]

    @property
    def best_agnostic(self) -> float:
        return self.grid[int(np.argmax(self.log_likelihood_agnostic))]


def _pooled(stats: SufficientStatistics, folds: np.ndarray):
    counts = stats.counts[folds].sum(axis=0)
    sums = stats.sums[folds].sum(axis=0)
    second = stats.second_moments[folds].sum(axis=0)
    return counts, sums, second


def _grid_log_likelihood(
    covariance: np.ndarray,
    held_out_scatter: np.ndarray,
    n_held_out: int,
    grid: tuple[float, ...],
    eigen: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Sum over held-out samples of log N(z; mu, Sigma_rho) for each rho on the grid, given
    the held-out scatter ``sum (z - mu)(z - mu)^T`` around the training means (``eigen``: the
    covariance's eigendecomposition, if already computed)."""
    d = covariance.shape[0]
    # LAPACK's MRRR driver (syevr): several times faster than numpy's divide-and-conquer here.
    eigenvalues, eigenvectors = eigh(covariance, driver="evr") if eigen is None else eigen
    eigenvalues = np.clip(eigenvalues, 0.0, None)
    target = eigenvalues.sum() / d
    # Diagonal of V^T A V without forming it.
    projected = np.einsum("ij,ij->j", eigenvectors, held_out_scatter @ eigenvectors)
    out = np.empty(len(grid))
    for i, rho in enumerate(grid):
        lam = (1.0 - rho) * eigenvalues + rho * target
        if np.any(lam <= 0):
            out[i] = -np.inf
            continue
        out[i] = -0.5 * (
            n_held_out * (d * np.log(2 * np.pi) + np.log(lam).sum()) + (projected / lam).sum()
        )
    return out


def cross_validate_shrinkage(
    stats: SufficientStatistics,
    grid: tuple[float, ...] = SHRINKAGE_GRID,
    fold_models: Sequence[FoldGaussian] | None = None,
) -> CrossValidation:
    """Held-out Gaussian log-likelihood of each shrinkage amount, from per-fold statistics.

    ``fold_models``: ``selection.fold_gaussians(stats)`` if already computed; their
    eigendecompositions of the training tied covariances are the ones needed here (the fit job
    computes them once for this and for the label-issue model)."""
    tied_eigen = {m.fold: (m.eigenvalues, m.eigenvectors) for m in fold_models or ()}
    folds = np.arange(stats.n_folds)
    ll_tied = np.zeros(len(grid))
    ll_agnostic = np.zeros(len(grid))
    used = 0
    for f in folds:
        train = folds[folds != f]
        n_f = int(stats.counts[f].sum())
        counts, sums, second = _pooled(stats, train)
        n_train = int(counts.sum())
        if n_f == 0 or n_train < 2:
            continue
        used += 1
        # Training fit, centred on the reference point.
        present = counts > 0
        class_means = np.zeros_like(sums)
        class_means[present] = sums[present] / counts[present, None]
        global_mean = sums.sum(axis=0) / n_train
        # A held-out class absent from training is scored against the global training mean.
        class_means[~present] = global_mean
        tied = (second - (sums[present].T / counts[present]) @ sums[present]) / n_train
        agnostic = second / n_train - np.outer(global_mean, global_mean)

        held_counts = stats.counts[f]
        held_sums = stats.sums[f]
        held_second = stats.second_moments[f]
        # sum_i (z_i - a_{y_i})(z_i - a_{y_i})^T over held-out i, with a_k the training means.
        cross = held_sums.T @ class_means
        scatter_tied = held_second - cross - cross.T + (class_means.T * held_counts) @ class_means
        held_total = held_sums.sum(axis=0)
        scatter_agnostic = (
            held_second
            - np.outer(held_total, global_mean)
            - np.outer(global_mean, held_total)
            + n_f * np.outer(global_mean, global_mean)
        )
        ll_tied += _grid_log_likelihood(tied, scatter_tied, n_f, grid, tied_eigen.get(int(f)))
        ll_agnostic += _grid_log_likelihood(agnostic, scatter_agnostic, n_f, grid)
    if used == 0:
        raise ValueError(
            "too few samples to cross-validate the shrinkage: need samples in at least two "
            "folds; pass a fixed shrinkage in [0, 1] instead of 'auto'"
        )
    return CrossValidation(tuple(grid), ll_tied, ll_agnostic)
