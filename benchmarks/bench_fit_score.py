"""Fit + score throughput: ours vs a scikit-learn implementation vs the machine's GEMM floor.

    python benchmarks/bench_fit_score.py            # N=200,000, D=512, K=1000
    python benchmarks/bench_fit_score.py --n 1000000

All three run in one process, one after another, on the same float32 features, so the ratios
are comparable even where absolute times drift on a shared machine.

- ours: streaming SufficientStatistics (chunks of 65,536 rows) -> fit_gaussians("auto", with
  5-fold CV over 13 shrinkage values) -> GaussianModel.score (rmd, md_class, md_agnostic,
  rmd_min, predicted_label for every sample), float64 throughout.
- scikit-learn: what a user would write: EmpiricalCovariance on class-centred features and on
  all features, then ``mahalanobis`` once per class. Its per-class loop is timed on
  ``--sklearn-classes`` classes and scaled to K (its cost is exactly linear in K); the table
  says so.
- floor: the dominant dense products of the same shapes, as plain float64 GEMMs: X^T X, two
  N x D x D whitening products and one N x D x K product.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc

import numpy as np

from service.statistics import SufficientStatistics, fit_gaussians

CHUNK = 65536


def make_features(n: int, d: int, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=0.5, size=(k, d)).astype(np.float32)
    labels = rng.integers(0, k, size=n)
    x = rng.standard_normal(size=(n, d), dtype=np.float32)
    x += means[labels]
    return x, labels, [str(i) for i in range(n)]


def timed(fn):
    tracemalloc.start()
    t0 = time.perf_counter()
    out = fn()
    elapsed = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out, elapsed, peak


def ours(x: np.ndarray, labels: list[str], ids: list[str]) -> dict[str, np.ndarray]:
    stats = SufficientStatistics(dim=x.shape[1])
    for s in range(0, x.shape[0], CHUNK):
        stats.update(x[s : s + CHUNK], labels[s : s + CHUNK], ids[s : s + CHUNK])
    model = fit_gaussians(stats, "auto")
    return model.score(x, labels)


def sklearn_impl(x: np.ndarray, y: np.ndarray, k: int, k_timed: int) -> tuple[float, float]:
    """Returns (fit seconds, per-class Mahalanobis seconds extrapolated to k classes)."""
    from sklearn.covariance import EmpiricalCovariance

    x64 = x.astype(np.float64)
    t0 = time.perf_counter()
    means = np.stack([x64[y == c].mean(axis=0) for c in range(k)])
    tied = EmpiricalCovariance(assume_centered=True).fit(x64 - means[y])
    agnostic = EmpiricalCovariance().fit(x64)
    fit_seconds = time.perf_counter() - t0
    t0 = time.perf_counter()
    md0 = agnostic.mahalanobis(x64)
    for c in range(k_timed):
        tied.location_ = means[c]
        _ = tied.mahalanobis(x64) - md0
    per_class = (time.perf_counter() - t0) / k_timed
    return fit_seconds, per_class * k


def gemm_floor(x: np.ndarray, k: int) -> float:
    x64 = x.astype(np.float64)
    d = x.shape[1]
    rng = np.random.default_rng(1)
    w = rng.normal(size=(d, d))
    m = rng.normal(size=(k, d))
    t0 = time.perf_counter()
    for s in range(0, x64.shape[0], CHUNK):
        block = x64[s : s + CHUNK]
        _ = block.T @ block
        a = block @ w
        _ = block @ w
        _ = a @ m.T
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--sklearn-classes", type=int, default=8, help="classes timed for sklearn")
    args = parser.parse_args()
    n, d, k = args.n, args.d, args.k
    x, y, ids = make_features(n, d, k)
    labels = [str(v) for v in y]
    print(f"N={n:,} D={d} K={k}  (features float32, {x.nbytes / 2**20:.0f} MiB)")

    _, t_floor, _ = timed(lambda: gemm_floor(x, k))
    scores, t_ours, peak_ours = timed(lambda: ours(x, labels, ids))
    (fit_s, score_s), _, peak_sk = timed(lambda: sklearn_impl(x, y, k, args.sklearn_classes))
    t_sklearn = fit_s + score_s
    assert np.isfinite(scores["rmd"]).all()

    rows = [
        ("ours (stats + auto fit + score)", t_ours, peak_ours),
        (f"scikit-learn (fit + {k} x mahalanobis; {args.sklearn_classes} timed, scaled)", t_sklearn, peak_sk),
        ("GEMM floor (same shapes, float64)", t_floor, None),
    ]
    print(f"{'implementation':<64} {'seconds':>9} {'x floor':>8} {'peak MiB':>9}")
    for name, seconds, peak in rows:
        mem = f"{peak / 2**20:9.0f}" if peak is not None else f"{'-':>9}"
        print(f"{name:<64} {seconds:9.2f} {seconds / t_floor:8.2f} {mem}")
    print(f"speed-up of ours over scikit-learn: {t_sklearn / t_ours:.1f}x; ours / GEMM floor: {t_ours / t_floor:.2f}")


if __name__ == "__main__":
    main()
