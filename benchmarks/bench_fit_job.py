"""The fit use case stage by stage on synthetic features: where a fit job's time goes.

    .venv/bin/python benchmarks/bench_fit_job.py --n 100000 --dim 512 --classes 100

Copies an N x D float32 matrix into an embedding store (the job's first step for uploaded
embeddings), then runs ``pipeline.fit_dataset.fit_and_score`` and ``publish`` exactly as the
fit job does, timing each stage (statistics, fit, scoring, neighbors, label issues, map,
publish), with peak resident memory. One run; the shares of the total are the numbers to read.

Then, in the same run on the same features, the job's own GEMM floor: the dense float64
products the job performs, as plain BLAS calls on 65,536-row chunks and nothing else:
X^T X (statistics), the two N x D x D whitening products and one N x D x K product (scoring),
three N x D x K passes (the label-issue posteriors, soft-label sums and refit) and the
label-issue rho selection (13 grid points x the selection rows x D x K). The kNN column is a
search, not a product; the job's ratio to the floor is printed with and without it.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.domain import JobStage  # noqa: E402
from service.pipeline.fit_dataset import FitSettings, copy_embeddings, fit_and_score, publish  # noqa: E402
from service.statistics.label_issues import SELECTION_SAMPLE_ROWS  # noqa: E402
from service.statistics.shrinkage import SHRINKAGE_GRID  # noqa: E402
from service.storage.embeddings import EmbeddingStore  # noqa: E402
from service.storage.fits import FitFiles  # noqa: E402

CHUNK = 65536


def gemm_floor(x: np.ndarray, k: int) -> dict[str, float]:
    """Seconds of the job's dense products (module docstring), timed by stage."""
    n, d = x.shape
    rng = np.random.default_rng(1)
    whiten = rng.normal(size=(d, d))
    means = rng.normal(size=(k, d))
    out = {"statistics": 0.0, "scoring": 0.0, "label_issues": 0.0}
    for start in range(0, n, CHUNK):
        block = x[start : start + CHUNK].astype(np.float64)
        t0 = time.perf_counter()
        _ = block.T @ block
        t1 = time.perf_counter()
        w = block @ whiten
        _ = block @ whiten
        _ = w @ means.T
        t2 = time.perf_counter()
        for _ in range(3):
            _ = block @ means.T
        t3 = time.perf_counter()
        out["statistics"] += t1 - t0
        out["scoring"] += t2 - t1
        out["label_issues"] += t3 - t2
    sample = x[: min(n, SELECTION_SAMPLE_ROWS)].astype(np.float64)
    t0 = time.perf_counter()
    for _ in SHRINKAGE_GRID:
        _ = sample @ means.T
    out["label_issues"] += time.perf_counter() - t0
    return out


class Timer:
    """Stages that record when each one starts."""

    def __init__(self) -> None:
        self.marks: list[tuple[str, float]] = []

    def set_stage(self, stage: JobStage, total: int | None) -> None:
        self.marks.append((str(stage), time.perf_counter()))

    def progress(self, done: int, total: int | None = None) -> None:
        pass

    def check(self) -> None:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--knn-max-items", type=int, default=20_000)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    labels = rng.integers(0, args.classes, args.n)
    centres = rng.normal(size=(args.classes, args.dim)).astype(np.float32)
    x = centres[labels] + 2.0 * rng.normal(size=(args.n, args.dim)).astype(np.float32)
    flipped = rng.random(args.n) < 0.1
    labels[flipped] = rng.integers(0, args.classes, int(flipped.sum()))
    with tempfile.TemporaryDirectory() as tmp:
        store = EmbeddingStore(Path(tmp) / "store")
        t0 = time.perf_counter()
        copy_embeddings(store, x, labels.astype(str), None, first_chunk=0, chunk_rows=65536)
        timer = Timer()
        timer.marks.append(("copy", t0))
        outcome = fit_and_score(store, FitSettings(knn_max_items=args.knn_max_items), timer)
        timer.set_stage(JobStage.PUBLISHING, None)
        publish(outcome, FitFiles(Path(tmp) / "fit"))
        end = time.perf_counter()
    # The map is computed after the label-issue stage inside fit_and_score's return.
    stages = [(name, (timer.marks[i + 1][1] if i + 1 < len(timer.marks) else end) - start)
              for i, (name, start) in enumerate(timer.marks)]
    total = sum(s for _, s in stages)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"fit job stages, N={args.n:,} D={args.dim} K={args.classes} (features {x.nbytes / 2**20:.0f} MiB, peak RSS {peak_mb:.0f} MiB)")
    print("| stage | seconds | share |\n|---|---|---|")
    for name, seconds in stages:
        print(f"| {name} | {seconds:.2f} | {seconds / total:.0%} |")
    print(f"| total | {total:.2f} | |")
    issues = dict(stages).get("label_issues", 0.0)
    print(f"label issues add {issues / (total - issues):.0%} to the rest of the job")
    floor = gemm_floor(x, args.classes)
    floor_total = sum(floor.values())
    knn = dict(stages).get("neighbors", 0.0)
    print("GEMM floor (same features, same run):", ", ".join(f"{k} {v:.2f} s" for k, v in floor.items()),
          f"total {floor_total:.2f} s")
    print(f"job / floor: {total / floor_total:.2f} (without the kNN column: {(total - knn) / floor_total:.2f})")
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"args": vars(args), "stages": stages, "peak_rss_mib": peak_mb, "gemm_floor": floor},
            indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
