"""The kNN label-agreement column above the exact limit: inverted-file search against exact.

    .venv/bin/python benchmarks/bench_knn_column.py --n 100000 --dim 512 --queries 2000

Synthetic L2-normalised features with structure (100 classes, 20 sub-clusters each, isotropic
noise: ``--noise`` sets how far neighbourhoods overlap), float32. Measured in one run:

- recall@10 of the service's inverted-file index (``pipeline.neighbors.build_ivf_index``, the
  index ``knn_agreement`` uses above ``DIFFICULTY_KNN_MAX_ITEMS``) against exact search, on
  ``--queries`` evenly spaced samples;
- the whole ``knn_agreement`` column both ways (exact: extrapolated from the query sample when
  ``--exact-full`` is not given, and said so), its mean absolute difference and the share of rows
  that agree exactly;
- with ``--index-search``, the two ways the column's neighbours can be searched side by side:
  faiss's inverted-file index asked for every row in batches (the column's search before the
  list-by-list join) and :func:`ivf_self_neighbors` (the list-by-list join it uses on a CPU),
  with the share of rows whose neighbour sets are identical;
- the index's memory (faiss keeps one float32 copy of the rows plus their int64 ids) and the peak
  resident set of the process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.pipeline.neighbors import (  # noqa: E402
    IVF_PROBES,
    build_index,
    build_ivf_index,
    ivf_self_neighbors,
    knn_agreement,
    search_every_row,
)


def features(n: int, dim: int, noise: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 100, n)
    centres = rng.normal(size=(100, dim)).astype(np.float32)
    sub = 0.7 * rng.normal(size=(100 * 20, dim)).astype(np.float32)
    x = centres[labels] + sub[labels * 20 + rng.integers(0, 20, n)]
    x += noise * rng.normal(size=(n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    flipped = rng.random(n) < 0.1
    labels[flipped] = rng.integers(0, 100, int(flipped.sum()))
    return x, np.asarray([f"c{v:03d}" for v in labels])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--noise", type=float, default=1.5)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--exact-full", action="store_true", help="also compute the exact column over all rows")
    parser.add_argument("--index-search", action="store_true",
                        help="also time faiss's index search of every row against the list-by-list join")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    x, labels = features(args.n, args.dim, args.noise)
    queries = np.unique(np.linspace(0, args.n - 1, args.queries).astype(np.int64))
    out: dict[str, object] = {"n": args.n, "dim": args.dim, "k": args.k, "noise": args.noise,
                              "load_average": os.getloadavg(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    t = time.perf_counter()
    flat = build_index(x)
    _, exact = flat.search(x[queries], args.k + 1)
    out["exact_query_seconds"] = time.perf_counter() - t
    del flat

    t = time.perf_counter()
    ivf = build_ivf_index(x)
    out["ivf_build_seconds"] = time.perf_counter() - t
    t = time.perf_counter()
    _, approximate = ivf.search(x[queries], args.k + 1)
    out["ivf_query_seconds"] = time.perf_counter() - t
    out["ivf_lists"], out["ivf_probes"] = int(ivf.nlist), IVF_PROBES
    # faiss: one float32 copy of every row and its int64 id in the inverted lists.
    out["ivf_index_bytes"] = int(ivf.ntotal) * (args.dim * 4 + 8) + int(ivf.nlist) * args.dim * 4
    del ivf

    def without_self(found: np.ndarray) -> list[set[int]]:
        return [set(row[row != q][: args.k].tolist()) for row, q in zip(found, queries, strict=True)]

    truth, got = without_self(exact), without_self(approximate)
    out["recall_at_k"] = float(np.mean([len(a & b) / args.k for a, b in zip(got, truth, strict=True)]))

    t = time.perf_counter()
    column = knn_agreement(x, labels, args.k, exact_max_items=0)
    out["approximate_column_seconds"] = time.perf_counter() - t
    if args.exact_full:
        t = time.perf_counter()
        reference = knn_agreement(x, labels, args.k)
        out["exact_column_seconds"] = time.perf_counter() - t
        out["exact_column_extrapolated"] = False
    else:
        # The exact column on the query rows only (same rows of the approximate one).
        reference_rows = np.asarray([np.mean(labels[list(s)] == labels[q]) for s, q in zip(truth, queries, strict=True)])
        column_rows = column[queries]
        out["exact_column_seconds"] = out["exact_query_seconds"] * args.n / queries.size
        out["exact_column_extrapolated"] = True
        reference, column = reference_rows, column_rows
    difference = np.abs(column - reference)
    out["column_mean_abs_difference"] = float(difference.mean())
    out["column_rows_identical"] = float(np.mean(difference < 1e-12))
    if args.index_search:
        t = time.perf_counter()
        index = build_ivf_index(x)
        searched = search_every_row(index, x, args.k + 1)
        out["index_search_seconds"] = time.perf_counter() - t
        del index
        t = time.perf_counter()
        joined = ivf_self_neighbors(x, args.k + 1)
        out["list_join_seconds"] = time.perf_counter() - t
        out["list_join_speedup"] = out["index_search_seconds"] / out["list_join_seconds"]
        out["same_neighbour_sets"] = float(np.mean((np.sort(searched, axis=1) == np.sort(joined, axis=1)).all(axis=1)))
    out["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out["speedup_vs_exact"] = out["exact_column_seconds"] / out["approximate_column_seconds"]
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
