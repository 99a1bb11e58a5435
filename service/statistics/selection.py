"""Shrinkage chosen by held-out *classification* log-loss of the Gaussian classifier.

The likelihood criterion of :mod:`service.statistics.shrinkage` asks how well ``Sigma_rho``
describes held-out features; label-issue detection asks how well the Gaussians *separate the
classes*. Here each rho is scored by the mean held-out log-loss of the tied-covariance Gaussian
classifier ``p(k | z) = softmax_k(-MD_k(z) / 2 + log pi_k)``: for every fold ``f`` the class
means, class priors and tied covariance come from the other folds' sufficient statistics, and
the held-out samples of ``f`` are scored against them.

Cost: one eigendecomposition of each fold's tied covariance (``Sigma_rho`` has the same
eigenvectors for every rho, with eigenvalues ``(1 - rho) * lambda + rho * mean(lambda)``), one
projection of each held-out sample on those eigenvectors (``D^2`` flops per sample), then
``K * D`` per sample and grid point. Unlike the likelihood, the log-loss is not a function of the
sufficient statistics alone: it needs the held-out features once, which the fit job's scoring
pass reads anyway, so :class:`HeldOutLogLoss` accumulates over chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.linalg import eigh

from service.statistics.rows import map_row_blocks
from service.statistics.shrinkage import SHRINKAGE_GRID
from service.statistics.sufficient import SufficientStatistics


@dataclass(frozen=True)
class FoldGaussian:
    """The tied-covariance Gaussian classifier fitted on every fold but ``fold``.

    Attributes:
        fold: the held-out fold.
        means: (K, D) class means of the training folds, centred on ``stats.reference``; a class
            with no training sample has its row set to the training mean (and prior ``-inf``).
        log_prior: (K,) log of the training class frequencies (``-inf`` for absent classes).
        eigenvalues: (D,) eigenvalues of the training tied covariance (divided by its N).
        eigenvectors: (D, D) the matching eigenvectors (columns).
    """

    fold: int
    means: np.ndarray
    log_prior: np.ndarray
    eigenvalues: np.ndarray
    eigenvectors: np.ndarray

    def project(self, centred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(n, D) features already centred on ``stats.reference`` -> the projected features
        ``(z - r) V`` and the projected means ``m V``, both in the eigenbasis."""
        return centred @ self.eigenvectors, self.means @ self.eigenvectors

    def distances(self, projected: np.ndarray, projected_means: np.ndarray, rho: float) -> np.ndarray:
        """(n, K) squared Mahalanobis distances to each class mean under ``Sigma_rho``."""
        lam = shrunk_eigenvalues(self.eigenvalues, rho)
        return distances_in_eigenbasis(projected, projected_means, lam)

    def discriminant(self, rho: float) -> FoldDiscriminant:
        """The linear form of this model's class posterior under ``Sigma_rho`` (from the
        eigenbasis: ``Sigma_rho^{-1} = V diag(1 / lambda_rho) V^T``)."""
        lam = shrunk_eigenvalues(self.eigenvalues, rho)
        if not np.all(lam > 0):
            raise ValueError(f"shrinkage {rho:g} leaves fold {self.fold}'s covariance singular")
        projected_means = self.means @ self.eigenvectors
        scaled = projected_means / lam
        return FoldDiscriminant(
            self.fold,
            self.eigenvectors @ scaled.T,
            np.einsum("kd,kd->k", projected_means, scaled),
            self.log_prior,
        )


@dataclass(frozen=True)
class FoldDiscriminant:
    """One fold model's class posterior at one rho, as a linear form.

    ``MD_k(z) = |z - r|^2 - 2 (z - r) . w_k + c_k`` under ``Sigma_rho^{-1}``; the first term is
    the same for every class and cancels in a softmax over classes at any temperature, so the
    posterior needs only :meth:`relative_distances`: N x D x K flops, where the distances
    themselves need the N x D^2 projection on the eigenbasis.

    Attributes:
        fold: the held-out fold.
        weights: (D, K) ``w_k = Sigma_rho^{-1} m_k`` (means centred on ``stats.reference``).
        offsets: (K,) ``c_k = m_k^T Sigma_rho^{-1} m_k``.
        log_prior: (K,) as :class:`FoldGaussian`.
    """

    fold: int
    weights: np.ndarray
    offsets: np.ndarray
    log_prior: np.ndarray

    def relative_distances(self, centred: np.ndarray) -> np.ndarray:
        """(n, K) ``MD_k(z) - |z - r|^2_{Sigma_rho^{-1}}`` for (n, D) features centred on
        ``stats.reference``: the distances shifted by a constant per row (may be negative)."""
        out = centred @ self.weights
        out *= -2.0
        out += self.offsets[None, :]
        return out


def shrunk_eigenvalues(eigenvalues: np.ndarray, rho: float) -> np.ndarray:
    """Eigenvalues of ``(1 - rho) Sigma + rho * trace(Sigma) / D * I`` from those of ``Sigma``
    (round-off negatives clipped to 0 first; rho = 0 can then give zeros: callers check)."""
    lam = np.clip(eigenvalues, 0.0, None)
    return (1.0 - rho) * lam + rho * (eigenvalues.sum() / eigenvalues.shape[0])


def distances_in_eigenbasis(
    projected: np.ndarray, projected_means: np.ndarray, eigenvalues: np.ndarray
) -> np.ndarray:
    """``sum_d (u_id - m_kd)^2 / lambda_d`` for (n, D) ``u``, (K, D) ``m``, (D,) ``lambda``: one
    GEMM for all classes, clipped at 0 (round-off)."""
    inv = 1.0 / eigenvalues
    out = projected @ (projected_means * inv).T
    out *= -2.0
    out += np.einsum("kd,d,kd->k", projected_means, inv, projected_means)[None, :]
    out += np.einsum("nd,d,nd->n", projected, inv, projected)[:, None]
    return np.maximum(out, 0.0, out=out)


def logsumexp(a: np.ndarray, axis: int = -1, keepdims: bool = False) -> np.ndarray:
    """``log(sum(exp(a)))`` along ``axis``, stable, for real arrays whose slices may hold
    ``-inf`` (an all ``-inf`` slice gives ``-inf``). scipy's version handles complex input,
    weights and signs, and was most of the label-issue fit's time."""
    top = np.max(a, axis=axis, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        out = np.log(np.sum(np.exp(a - top), axis=axis, keepdims=True)) + top
    return out if keepdims else np.squeeze(out, axis=axis)


def log_posterior(distances: np.ndarray, log_prior: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """(n, K) ``log softmax_k(-MD_k / (2 T) + log pi_k)`` for a (K,) or (n, K) ``log_prior``;
    classes with prior ``-inf`` get ``-inf``. Computed in row blocks (:mod:`.rows`)."""
    out = np.empty(np.shape(distances))

    def block(rows: slice) -> None:
        prior = log_prior[rows] if log_prior.ndim == 2 else log_prior[None, :]
        logits = distances[rows] * (-0.5 / temperature) + prior
        out[rows] = logits - logsumexp(logits, axis=1, keepdims=True)

    map_row_blocks(block, out.shape[0])
    return out


def fold_gaussians(stats: SufficientStatistics) -> list[FoldGaussian]:
    """One :class:`FoldGaussian` per fold that has held-out samples and >= 2 training samples."""
    out = []
    for f in range(stats.n_folds):
        train = np.arange(stats.n_folds) != f
        counts = stats.counts[train].sum(axis=0)
        n_train = int(counts.sum())
        if int(stats.counts[f].sum()) == 0 or n_train < 2:
            continue
        sums = stats.sums[train].sum(axis=0)
        second = stats.second_moments[train].sum(axis=0)
        present = counts > 0
        means = np.empty_like(sums)
        means[present] = sums[present] / counts[present, None]
        means[~present] = sums.sum(axis=0) / n_train
        tied = (second - (sums[present].T / counts[present]) @ sums[present]) / n_train
        tied = (tied + tied.T) / 2
        eigenvalues, eigenvectors = eigh(tied, driver="evr")
        with np.errstate(divide="ignore"):
            log_prior = np.log(counts / n_train)
        out.append(FoldGaussian(f, means, log_prior, eigenvalues, eigenvectors))
    if not out:
        raise ValueError(
            "too few samples to cross-validate: need samples in at least two folds; pass a "
            "fixed shrinkage instead"
        )
    return out


@dataclass(frozen=True)
class ClassificationCV:
    """Held-out classification quality of each grid point.

    Attributes:
        grid: the rhos tried.
        log_loss: (R,) mean held-out ``-log p(y_i | z_i)`` per grid point (``inf`` where
            ``Sigma_rho`` is singular).
        error_rate: (R,) held-out share with ``argmax_k p(k | z_i) != y_i``.
        n_held_out: samples scored (those whose class is present in their training folds).
    """

    grid: tuple[float, ...]
    log_loss: np.ndarray
    error_rate: np.ndarray
    n_held_out: int

    @property
    def best(self) -> float:
        """The rho with the smallest held-out log-loss (the smaller rho on a tie)."""
        return self.grid[int(np.argmin(self.log_loss))]


class HeldOutLogLoss:
    """Accumulates the held-out classification log-loss of every grid rho over feature chunks.

    ``update(features, labels, folds)`` with each sample's fold (:func:`assign_folds` of its ID,
    as in the statistics), features in the space the statistics were accumulated in (i.e.
    already L2-normalised when the fit normalises); ``result()`` once all chunks are in. Chunks
    may come in any order and any size; every labelled sample should come exactly once.
    """

    def __init__(
        self,
        stats: SufficientStatistics,
        grid: Sequence[float] = SHRINKAGE_GRID,
        fold_models: Sequence[FoldGaussian] | None = None,
    ):
        if stats.reference is None:
            raise ValueError("the statistics are empty")
        self.stats = stats
        self.grid = tuple(float(g) for g in grid)
        # The fold eigendecompositions are the expensive part; callers that also need
        # out-of-fold distances compute them once (fold_gaussians) and pass them here.
        models = fold_gaussians(stats) if fold_models is None else fold_models
        self.folds = {g.fold: g for g in models}
        self._class_index = {c: i for i, c in enumerate(stats.classes)}
        self._loss = np.zeros(len(self.grid))
        self._errors = np.zeros(len(self.grid))
        self._count = 0
        self._lam = {
            f: [shrunk_eigenvalues(g.eigenvalues, rho) for rho in self.grid]
            for f, g in self.folds.items()
        }

    def update(self, features: np.ndarray, labels: Sequence[str], folds: np.ndarray) -> HeldOutLogLoss:
        x = np.asarray(features, dtype=np.float64)
        y = np.fromiter((self._class_index[str(c)] for c in labels), dtype=np.int64, count=len(labels))
        folds = np.asarray(folds)
        if x.shape[0] != y.shape[0] or folds.shape[0] != y.shape[0]:
            raise ValueError("features, labels and folds must have the same length")
        for f, model in self.folds.items():
            rows = np.flatnonzero(folds == f)
            rows = rows[np.isfinite(model.log_prior[y[rows]])]
            if rows.size == 0:
                continue
            u, m = model.project(x[rows] - self.stats.reference)
            for i, lam in enumerate(self._lam[f]):
                if np.any(lam <= 0):
                    self._loss[i] = np.inf
                    continue
                lp = log_posterior(distances_in_eigenbasis(u, m, lam), model.log_prior)
                self._loss[i] -= lp[np.arange(rows.size), y[rows]].sum()
                self._errors[i] += int((lp.argmax(axis=1) != y[rows]).sum())
            self._count += rows.size
        return self

    def result(self) -> ClassificationCV:
        if self._count == 0:
            raise ValueError("no held-out sample was scored")
        return ClassificationCV(
            self.grid, self._loss / self._count, self._errors / self._count, self._count
        )


def select_shrinkage_by_log_loss(
    stats: SufficientStatistics,
    features: np.ndarray,
    labels: Sequence[str],
    folds: np.ndarray,
    grid: Sequence[float] = SHRINKAGE_GRID,
    fold_models: Sequence[FoldGaussian] | None = None,
) -> ClassificationCV:
    """:class:`HeldOutLogLoss` over one array: (N, D) ``features`` (the samples of ``stats``, in
    its space), (N,) ``labels`` and (N,) ``folds``. ``.best`` is the rho to fit with."""
    return HeldOutLogLoss(stats, grid, fold_models).update(features, labels, folds).result()
