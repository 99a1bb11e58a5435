"""Fit class-conditional Gaussians (tied covariance) and a class-agnostic Gaussian, then score.

Conventions (docs/method.md): covariances divided by N, float64, shrunk towards a scaled
identity; squared Mahalanobis distances through Cholesky factors; never an N x N matrix.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np
from scipy.linalg import eigh, solve_triangular

from service.errors import InvalidInput
from service.statistics.shrinkage import CrossValidation, cross_validate_shrinkage, shrink
from service.statistics.sufficient import SufficientStatistics

if TYPE_CHECKING:  # selection imports this package's shrinkage module
    from service.statistics.selection import FoldGaussian

Shrinkage = float | Literal["auto", "auto-shared"]
AUTO_MODES = ("auto", "auto-shared")

# Largest condition number accepted for a shrunk covariance: beyond it float64 distances lose
# most of their digits.
MAX_CONDITION = 1e12
# Rows per scoring batch, by the bytes of one float64 (rows, D) temporary: 8 MiB, 2,048 rows at
# D = 512. Each batch makes several such temporaries; below glibc's 32 MiB mmap threshold, freed
# ones are reused instead of mapped and faulted in afresh. 8,192-row batches (32 MiB) scored
# 200,000 x 512 x 100 in 5.2-7.0 s, 2,048-row batches in 4.4-4.8 s (alternating processes).
SCORE_BLOCK_BYTES = 8 << 20


class FitError(InvalidInput):
    """The data cannot be fitted as asked; the message says what to change."""


def normalize_features(features: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero)."""
    x = np.asarray(features)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.finfo(x.dtype if x.dtype.kind == "f" else np.float64).tiny)


@dataclass
class GaussianModel:
    """Fitted Gaussians. Means are absolute; covariances are the unshrunk estimates.

    Attributes:
        classes: (K,) class labels, sorted.
        class_counts: (K,) training samples per class.
        means: (K, D) class means ``mu_k``.
        mean_agnostic: (D,) ``mu_0``.
        covariance: (D, D) tied covariance ``Sigma`` (divided by N, before shrinkage).
        covariance_agnostic: (D, D) ``Sigma_0`` (divided by N, before shrinkage).
        shrinkage, shrinkage_agnostic: the rho applied to each.
        normalized: whether features are L2-normalised before fitting and scoring.
        cross_validation: held-out log-likelihood per grid point when shrinkage was "auto".
    """

    classes: np.ndarray
    class_counts: np.ndarray
    means: np.ndarray
    mean_agnostic: np.ndarray
    covariance: np.ndarray
    covariance_agnostic: np.ndarray
    shrinkage: float
    shrinkage_agnostic: float
    normalized: bool = False
    cross_validation: CrossValidation | None = None
    _whiten: np.ndarray = field(init=False, repr=False)
    _whiten_agnostic: np.ndarray = field(init=False, repr=False)
    _whitened_means: np.ndarray = field(init=False, repr=False)
    _class_index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._whiten = _inverse_cholesky(shrink(self.covariance, self.shrinkage), "tied", self)
        self._whiten_agnostic = _inverse_cholesky(
            shrink(self.covariance_agnostic, self.shrinkage_agnostic), "class-agnostic", self
        )
        # Centre on mu_0 before whitening: distances are differences of nearby large vectors
        # otherwise, and features with a big common offset would lose digits.
        self._whitened_means = (self.means - self.mean_agnostic) @ self._whiten.T
        self._class_index = {str(c): i for i, c in enumerate(self.classes)}

    @property
    def dim(self) -> int:
        return int(self.mean_agnostic.shape[0])

    @property
    def count(self) -> int:
        return int(self.class_counts.sum())

    def score(
        self, features: np.ndarray, labels: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Scores for each row of ``features`` (in the space the model was fitted on, before
        normalisation). Always ``md_agnostic``, ``rmd_min`` and ``predicted_label``; with labels
        also ``md_class`` and ``rmd`` (relative distance to the given label's Gaussian)."""
        x = np.asarray(features)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must have shape (n, {self.dim}), got {x.shape}")
        if not np.isfinite(x).all():
            raise ValueError("features contain NaN or inf")
        label_index = None
        if labels is not None:
            if len(labels) != x.shape[0]:
                raise ValueError(f"got {x.shape[0]} feature rows and {len(labels)} labels")
            label_index = self.label_indices(labels)
        n = x.shape[0]
        md_agnostic = np.empty(n)
        rmd_min = np.empty(n)
        predicted = np.empty(n, dtype=np.int64)
        md_class = np.empty(n) if label_index is not None else None
        mean_norms = np.einsum("kd,kd->k", self._whitened_means, self._whitened_means)
        batch = max(1, SCORE_BLOCK_BYTES // (8 * self.dim))
        for start in range(0, n, batch):
            stop = min(start + batch, n)
            z = np.asarray(x[start:stop], dtype=np.float64)
            if self.normalized:
                z = normalize_features(z)
            z = z - self.mean_agnostic  # never in place: z may be the caller's array
            w = z @ self._whiten.T
            w0 = z @ self._whiten_agnostic.T
            md0 = np.einsum("nd,nd->n", w0, w0)
            # All K distances with one GEMM: |w|^2 - 2 w.m_k + |m_k|^2.
            all_md = w @ self._whitened_means.T
            all_md *= -2.0
            all_md += mean_norms[None, :]
            all_md += np.einsum("nd,nd->n", w, w)[:, None]
            np.maximum(all_md, 0.0, out=all_md)
            best = np.argmin(all_md, axis=1)
            predicted[start:stop] = best
            md_agnostic[start:stop] = md0
            rmd_min[start:stop] = all_md[np.arange(stop - start), best] - md0
            if md_class is not None:
                # The own-class distance directly, without the cancellation of the GEMM form.
                diff = w - self._whitened_means[label_index[start:stop]]
                md_class[start:stop] = np.einsum("nd,nd->n", diff, diff)
        out = {
            "md_agnostic": md_agnostic,
            "rmd_min": rmd_min,
            "predicted_label": self.classes[predicted],
        }
        if md_class is not None:
            out["md_class"] = md_class
            out["rmd"] = md_class - md_agnostic
        return out

    def label_indices(self, labels: Sequence[str]) -> np.ndarray:
        try:
            return np.fromiter(
                (self._class_index[str(label)] for label in labels), dtype=np.int64, count=len(labels)
            )
        except KeyError as exc:
            raise ValueError(
                f"label {exc.args[0]!r} is not one of the {len(self.classes)} fitted classes"
            ) from None

    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {
            "classes": np.asarray(self.classes, dtype=np.str_),
            "class_counts": self.class_counts,
            "means": self.means,
            "mean_agnostic": self.mean_agnostic,
            "covariance": self.covariance,
            "covariance_agnostic": self.covariance_agnostic,
            "shrinkage": np.array(self.shrinkage),
            "shrinkage_agnostic": np.array(self.shrinkage_agnostic),
            "normalized": np.array(self.normalized),
        }
        if self.cross_validation is not None:
            out["cv_grid"] = np.asarray(self.cross_validation.grid)
            out["cv_log_likelihood_tied"] = self.cross_validation.log_likelihood_tied
            out["cv_log_likelihood_agnostic"] = self.cross_validation.log_likelihood_agnostic
        return out

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> GaussianModel:
        cv = None
        if "cv_grid" in arrays:
            cv = CrossValidation(
                tuple(float(g) for g in arrays["cv_grid"]),
                np.asarray(arrays["cv_log_likelihood_tied"]),
                np.asarray(arrays["cv_log_likelihood_agnostic"]),
            )
        return cls(
            classes=np.asarray(arrays["classes"]).astype(str),
            class_counts=np.asarray(arrays["class_counts"]),
            means=np.asarray(arrays["means"], dtype=np.float64),
            mean_agnostic=np.asarray(arrays["mean_agnostic"], dtype=np.float64),
            covariance=np.asarray(arrays["covariance"], dtype=np.float64),
            covariance_agnostic=np.asarray(arrays["covariance_agnostic"], dtype=np.float64),
            shrinkage=float(arrays["shrinkage"]),
            shrinkage_agnostic=float(arrays["shrinkage_agnostic"]),
            normalized=bool(arrays["normalized"]),
            cross_validation=cv,
        )


def parse_shrinkage(value: object) -> Shrinkage:
    """The one rule for the ``shrinkage`` option (API, CLI and fit): ``"auto"``,
    ``"auto-shared"`` or a number in [0, 1] (numbers may come as text from a command line)."""
    if isinstance(value, str) and value in AUTO_MODES:
        return value  # type: ignore[return-value]
    try:
        rho = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        rho = float("nan")
    if isinstance(value, bool) or not 0.0 <= rho <= 1.0:
        shown = repr(value)[:40]
        raise FitError(f"shrinkage must be 'auto', 'auto-shared' or a number in [0, 1], got {shown}")
    return rho


def fit_gaussians(
    stats: SufficientStatistics, shrinkage: Shrinkage = "auto", fold_models: Sequence[FoldGaussian] | None = None
) -> GaussianModel:
    """Fit from sufficient statistics.

    ``shrinkage``: a rho in [0, 1] for both covariances; ``"auto"``: for each covariance the grid
    rho with the best 5-fold held-out likelihood; ``"auto-shared"``: the tied covariance's choice
    applied to both (docs/method.md). The model normalises what it scores exactly when the
    statistics were accumulated on L2-normalised features (``stats.normalized``).
    ``fold_models``: ``selection.fold_gaussians(stats)`` if already computed (reused by the
    cross-validation)."""
    n = stats.count
    if n < 2:
        raise FitError(f"need at least 2 labelled samples to fit, got {n}")
    shrinkage = parse_shrinkage(shrinkage)
    cv = None
    if isinstance(shrinkage, str):
        cv = cross_validate_shrinkage(stats, fold_models=fold_models)
        rho, rho_agnostic = cv.best_tied, cv.best_agnostic
        if shrinkage == "auto-shared":
            # One rho for both covariances, the tied one's: MD_k and MD_0 are then measured in
            # equally shrunk spaces (docs/evidence.md: on 2,000 Fashion-MNIST images "auto" chose
            # 0.1 and 0.03 and the mislabel AUROC fell from 0.95 to 0.79).
            rho_agnostic = rho
    else:
        rho = rho_agnostic = shrinkage

    counts = stats.counts.sum(axis=0)
    sums = stats.sums.sum(axis=0)
    second = stats.second_moments.sum(axis=0)
    present = counts > 0
    classes = np.asarray(stats.classes, dtype=np.str_)[present]
    counts, sums = counts[present], sums[present]
    order = np.argsort(classes, kind="stable")
    classes, counts, sums = classes[order], counts[order], sums[order]

    centred_means = sums / counts[:, None]
    global_centred = sums.sum(axis=0) / n
    tied = (second - (sums.T / counts) @ sums) / n
    agnostic = second / n - np.outer(global_centred, global_centred)
    tied = (tied + tied.T) / 2
    agnostic = (agnostic + agnostic.T) / 2
    if np.trace(agnostic) <= 0:
        raise FitError("all features are identical: the covariance is zero")
    return GaussianModel(
        classes=classes,
        class_counts=counts,
        means=centred_means + stats.reference,
        mean_agnostic=global_centred + stats.reference,
        covariance=tied,
        covariance_agnostic=agnostic,
        shrinkage=rho,
        shrinkage_agnostic=rho_agnostic,
        normalized=stats.normalized,
        cross_validation=cv,
    )


def _inverse_cholesky(covariance: np.ndarray, which: str, model: GaussianModel) -> np.ndarray:
    """``L^-1`` with ``L L^T = covariance``: whitening is then one GEMM per batch."""
    d = covariance.shape[0]
    eigenvalues = eigh(covariance, eigvals_only=True, driver="evr")
    if eigenvalues[-1] <= 0 or eigenvalues[0] <= eigenvalues[-1] / MAX_CONDITION:
        raise FitError(
            f"the {which} covariance is singular or too ill-conditioned to invert "
            f"(N={model.count}, D={d}, K={len(model.classes)}, shrinkage "
            f"{model.shrinkage if which == 'tied' else model.shrinkage_agnostic:g}; smallest/"
            f"largest eigenvalue {max(eigenvalues[0], 0.0) / max(eigenvalues[-1], 1e-300):.1e}). "
            "Shrinkage is too small for this data: use shrinkage='auto' or a larger value "
            "(e.g. 0.01 to 0.1)."
        )
    lower = np.linalg.cholesky(covariance)
    return solve_triangular(lower, np.eye(d), lower=True)
