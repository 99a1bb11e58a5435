"""Streaming sufficient statistics for class-conditional Gaussians with a tied covariance.

Everything the fit needs (class means, the tied and the class-agnostic covariance, and the
cross-validated shrinkage) is a function of per-fold, per-class counts and sums and a per-fold
second moment. These merge exactly, so chunks, workers and later uploads combine without a second
pass over the features.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from service.statistics.folds import N_FOLDS, assign_folds

# Size of the float64 working block of an update: rows are gathered, centred and multiplied in
# blocks this big (8,192 rows at D = 512), reusing one buffer (big enough for SYRK to run at its
# full rate: 2,048-row blocks ran ~25% slower; 50,000 x 512 measured). Converting a
# whole 65,536-row chunk at once wrote 268 MB of fresh pages: 1.0 s at 50,000 x 512, against
# 0.17 s for the SYRK itself (now 0.35-0.43 s).
BLOCK_BYTES = 32 << 20


@dataclass
class SufficientStatistics:
    """Per-fold statistics of features ``z`` (float64), centred on a fixed ``reference`` point.

    Attributes:
        dim: feature dimension D.
        n_folds: number of cross-validation folds (folds come from a hash of the sample ID).
        classes: class labels in the order of the class axis (insertion order).
        reference: (D,) point the sums are centred on; fixed by the first update, so that
            features with a large common offset lose no precision.
        counts: (F, K) samples per fold and class.
        sums: (F, K, D) sum of ``z - reference`` per fold and class.
        second_moments: (F, D, D) sum of ``(z - reference)(z - reference)^T`` per fold.
        normalized: whether the features were L2-normalised before they were added; the model
            fitted from these statistics normalises what it scores exactly when this is set.
    """

    dim: int
    normalized: bool = False
    n_folds: int = N_FOLDS
    classes: list[str] = field(default_factory=list)
    reference: np.ndarray | None = None
    counts: np.ndarray = field(init=False)
    sums: np.ndarray = field(init=False)
    second_moments: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        if self.dim < 1:
            raise ValueError("feature dimension must be at least 1")
        k = len(self.classes)
        self.counts = np.zeros((self.n_folds, k), dtype=np.int64)
        self.sums = np.zeros((self.n_folds, k, self.dim), dtype=np.float64)
        self.second_moments = np.zeros((self.n_folds, self.dim, self.dim), dtype=np.float64)

    @property
    def count(self) -> int:
        return int(self.counts.sum())

    @property
    def class_counts(self) -> dict[str, int]:
        totals = self.counts.sum(axis=0)
        return {c: int(n) for c, n in zip(self.classes, totals, strict=True)}

    def update(
        self, features: np.ndarray, labels: Sequence[str], sample_ids: Sequence[str]
    ) -> SufficientStatistics:
        """Add a chunk of labelled features in place; returns self."""
        x = np.asarray(features)
        if x.dtype.kind != "f":
            x = x.astype(np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"features must have shape (n, {self.dim}), got {x.shape}")
        n = x.shape[0]
        if len(labels) != n or len(sample_ids) != n:
            raise ValueError(
                f"got {n} feature rows, {len(labels)} labels and {len(sample_ids)} sample IDs"
            )
        if n == 0:
            return self
        if not np.isfinite(x).all():
            bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
            raise ValueError(f"features contain NaN or inf in {bad.size} rows (first: {bad[:5].tolist()})")
        if self.reference is None:
            self.reference = x.mean(axis=0, dtype=np.float64)

        class_index = self._class_indices([str(label) for label in labels])
        folds = assign_folds(sample_ids, self.n_folds)
        k = len(self.classes)
        key = folds * k + class_index
        self.counts += np.bincount(key, minlength=self.n_folds * k).reshape(self.n_folds, k)
        # Rows sorted by (fold, class): each fold's rows, and each class's within it, are then
        # contiguous, so a block of them needs one product per fold and one sum per class.
        order = np.argsort(key, kind="stable")
        key_sorted = key[order]
        flat_sums = self.sums.reshape(self.n_folds * k, self.dim)
        rows = max(1, BLOCK_BYTES // (8 * self.dim))
        block = np.empty((min(rows, n), self.dim))
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            z = block[: stop - start]
            # Gathered and centred into one reused float64 buffer: float32 -> float64 is exact.
            np.subtract(x[order[start:stop]], self.reference, out=z)
            keys = key_sorted[start:stop]
            bounds = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1], True])
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                flat_sums[keys[a]] += z[a:b].sum(axis=0)
            fold_of = keys // k
            fold_bounds = np.flatnonzero(np.r_[True, fold_of[1:] != fold_of[:-1], True])
            for a, b in zip(fold_bounds[:-1], fold_bounds[1:], strict=True):
                part = z[a:b]
                # ``part.T @ part`` is dispatched to SYRK by numpy: half the FLOPs of a GEMM.
                self.second_moments[fold_of[a]] += part.T @ part
        return self

    def merge(self, other: SufficientStatistics) -> SufficientStatistics:
        """Exact union of two sets of statistics (new object; neither input changes)."""
        return self.copy().merge_in_place(other)

    def merge_in_place(self, other: SufficientStatistics) -> SufficientStatistics:
        """Add ``other`` to these statistics (``other`` does not change); returns self. For
        running totals: no copy of the D x D moments per merge."""
        if other.dim != self.dim or other.n_folds != self.n_folds:
            raise ValueError("cannot merge statistics of different dimension or fold count")
        if other.normalized != self.normalized:
            raise ValueError("cannot merge statistics of normalised and raw features")
        if other.reference is None:
            return self
        if self.reference is None:
            copied = other.copy()
            self.classes, self.reference = copied.classes, copied.reference
            self.counts, self.sums, self.second_moments = copied.counts, copied.sums, copied.second_moments
            return self
        # Re-centre ``other`` on our reference: z - r1 = (z - r2) + d with d = r2 - r1.
        d = other.reference - self.reference
        fold_sums = other.sums.sum(axis=1)  # (F, D)
        fold_counts = other.counts.sum(axis=1)  # (F,)
        shifted_second = (
            other.second_moments
            + fold_sums[:, :, None] * d[None, None, :]
            + d[None, :, None] * fold_sums[:, None, :]
            + fold_counts[:, None, None] * np.outer(d, d)[None]
        )
        shifted_sums = other.sums + other.counts[:, :, None] * d[None, None, :]
        index = self._class_indices(other.classes)
        self.counts[:, index] += other.counts
        self.sums[:, index] += shifted_sums
        self.second_moments += shifted_second
        return self

    def copy(self) -> SufficientStatistics:
        out = SufficientStatistics(
            dim=self.dim, normalized=self.normalized, n_folds=self.n_folds, classes=list(self.classes)
        )
        out.reference = None if self.reference is None else self.reference.copy()
        out.counts = self.counts.copy()
        out.sums = self.sums.copy()
        out.second_moments = self.second_moments.copy()
        return out

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Plain arrays (no pickles) for ``np.savez``; inverse of :meth:`from_arrays`."""
        return {
            "dim": np.array(self.dim),
            "n_folds": np.array(self.n_folds),
            "normalized": np.array(self.normalized),
            "classes": np.array(self.classes, dtype=np.str_),
            "reference": np.zeros(0) if self.reference is None else self.reference,
            "counts": self.counts,
            "sums": self.sums,
            "second_moments": self.second_moments,
        }

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> SufficientStatistics:
        out = cls(
            dim=int(arrays["dim"]),
            normalized=bool(arrays["normalized"]) if "normalized" in arrays else False,
            n_folds=int(arrays["n_folds"]),
        )
        out.classes = [str(c) for c in arrays["classes"]]
        reference = np.asarray(arrays["reference"], dtype=np.float64)
        out.reference = reference if reference.size else None
        out.counts = np.asarray(arrays["counts"], dtype=np.int64).copy()
        out.sums = np.asarray(arrays["sums"], dtype=np.float64).copy()
        out.second_moments = np.asarray(arrays["second_moments"], dtype=np.float64).copy()
        return out

    def _class_indices(self, labels: Sequence[str]) -> np.ndarray:
        """Index of each label on the class axis, growing the axis for unseen classes."""
        position = {c: i for i, c in enumerate(self.classes)}
        new = [c for c in dict.fromkeys(labels) if c not in position]
        if new:
            for c in new:
                position[c] = len(self.classes)
                self.classes.append(c)
            grow = len(new)
            self.counts = np.concatenate(
                [self.counts, np.zeros((self.n_folds, grow), dtype=np.int64)], axis=1
            )
            self.sums = np.concatenate(
                [self.sums, np.zeros((self.n_folds, grow, self.dim))], axis=1
            )
        return np.fromiter((position[c] for c in labels), dtype=np.int64, count=len(labels))
