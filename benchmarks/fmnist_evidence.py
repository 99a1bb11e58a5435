"""The paper's Figure 1 claims on real images: Fashion-MNIST through the embedding pipeline with
the offline EfficientNet-Lite0 backbone.

1. Label noise: flip 10% of the labels of an N-image training subset; AUROC of ``rmd`` for
   finding the flipped ones, beside a 10-NN label-disagreement baseline on the same features,
   for several N (nested subsets of the embedded set) and shrinkage settings.
2. Corruption: Gaussian noise and Gaussian blur at 5 severities on test images; mean ``rmd``
   per severity (model fitted on the clean training subset) and Spearman's rho with severity.

Run (about 15-25 minutes on 2 shared cores; embeddings are cached in --work-dir):

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/fmnist_evidence.py --n 10000 --test-n 500 \
        --work-dir /tmp/fmnist-evidence --json docs/evidence.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fmnist  # noqa: E402

from service.encoders import load_encoder  # noqa: E402
from service.pipeline.embedding import embed_source  # noqa: E402
from service.statistics import SufficientStatistics, fit_gaussians, normalize_features  # noqa: E402
from service.storage.embeddings import EmbeddingStore  # noqa: E402

SEED = 0
SHRINKAGES: tuple[float | str, ...] = (1e-6, 0.01, 0.1, "auto")


def embed(samples, encoder, directory: Path, label: str) -> dict[str, np.ndarray]:
    store = EmbeddingStore(directory)
    started = time.perf_counter()
    last = [0.0]

    def progress(done: int, total: int | None) -> None:
        now = time.perf_counter()
        if now - last[0] > 15 or done == total:
            last[0] = now
            rate = done / max(now - started, 1e-9)
            print(f"  {label}: {done}/{total} ({rate:.1f}/s)", file=sys.stderr, flush=True)

    report = embed_source(samples, encoder, store, total=len(samples), progress=progress)
    print(
        f"  {label}: embedded {report.embedded} new, {report.skipped_existing} cached, "
        f"{len(report.failures)} failed, {report.seconds:.0f}s",
        file=sys.stderr,
    )
    return dict(zip(store.sample_ids().tolist(), store.features(), strict=True))


def fit(features: np.ndarray, labels: np.ndarray, ids: list[str], shrinkage: float | str):
    stats = SufficientStatistics(dim=features.shape[1], normalized=True)
    stats.update(normalize_features(features), [str(x) for x in labels], ids)
    return fit_gaussians(stats, shrinkage)


def label_noise(
    features: np.ndarray, noisy: np.ndarray, flipped: np.ndarray, ids: list[str], sizes: list[int]
) -> list[dict]:
    rng = np.random.default_rng(SEED + 1)
    order = rng.permutation(features.shape[0])
    rows = []
    for n in sizes:
        pick = np.sort(order[:n])
        x, y, f = features[pick], noisy[pick], flipped[pick]
        sub_ids = [ids[i] for i in pick]
        row: dict = {"n": n, "flipped": int(f.sum())}
        for shrinkage in SHRINKAGES:
            started = time.perf_counter()
            model = fit(x, y, sub_ids, shrinkage)
            s = model.score(x, [str(v) for v in y])
            key = "auto" if shrinkage == "auto" else f"rho={shrinkage:g}"
            row[key] = fmnist.auroc(s["rmd"], f)
            if shrinkage == "auto":
                row["auto_rho"] = model.shrinkage
                row["auto_rho_agnostic"] = model.shrinkage_agnostic
                row["margin_auto"] = fmnist.auroc(s["rmd"] - s["rmd_min"], f)
                row["fit_seconds_auto"] = time.perf_counter() - started
        row["knn10"] = fmnist.auroc(fmnist.knn_disagreement(x, y, k=10), f)
        rows.append(row)
        print(f"  label noise N={n}: {row}", file=sys.stderr, flush=True)
    return rows


def corruption(encoder, model, work: Path, test_n: int) -> dict:
    images, labels = fmnist.load_fashion_mnist("test")
    pick = fmnist.stratified_subset(labels, test_n, SEED + 2)
    images, labels = images[pick], labels[pick]
    out: dict = {"n_per_severity": int(len(pick))}
    clean = fmnist.png_samples(images, labels, [f"t{i}" for i in pick])
    clean_f = embed(clean, encoder, work / "test-clean", "clean test")
    clean_rmd = model.score(
        np.stack([clean_f[s.sample_id] for s in clean]), [str(v) for v in labels]
    )["rmd"]
    for kind in ("noise", "blur"):
        severity_all = [np.zeros(len(pick))]
        rmd_all = [clean_rmd]
        means = [float(clean_rmd.mean())]
        for severity in range(1, 6):
            corrupted = np.stack(
                [
                    fmnist.corrupt(im, kind, severity, SEED + 1000 * severity + i)
                    for i, im in enumerate(images)
                ]
            )
            ids = [f"t{i}-{kind}{severity}" for i in pick]
            feats = embed(
                fmnist.png_samples(corrupted, labels, ids),
                encoder,
                work / f"test-{kind}{severity}",
                f"{kind} {severity}",
            )
            rmd = model.score(np.stack([feats[i] for i in ids]), [str(v) for v in labels])["rmd"]
            severity_all.append(np.full(len(pick), severity))
            rmd_all.append(rmd)
            means.append(float(rmd.mean()))
        rho_samples = spearmanr(np.concatenate(severity_all), np.concatenate(rmd_all)).statistic
        rho_means = spearmanr(np.arange(6), means).statistic
        out[kind] = {
            "mean_rmd_by_severity_0_to_5": means,
            "spearman_per_sample": float(rho_samples),
            "spearman_of_means": float(rho_means),
        }
        print(f"  {kind}: {out[kind]}", file=sys.stderr, flush=True)
    return out


def markdown(result: dict) -> str:
    lines = [
        f"Label noise: {result['flip_fraction']:.0%} of labels flipped, AUROC for finding them "
        f"(efficientnet-lite0, {result['dim']}-d, L2-normalised)",
        "",
        "| N | flipped | rmd rho=1e-6 | rmd rho=0.01 | rmd rho=0.1 | rmd auto (rho picked) | margin rmd-rmd_min (auto) | 10-NN disagreement |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["label_noise"]:
        lines.append(
            f"| {r['n']:,} | {r['flipped']} | {r['rho=1e-06']:.3f} | {r['rho=0.01']:.3f} | {r['rho=0.1']:.3f} | "
            f"{r['auto']:.3f} ({r['auto_rho']:g}) | {r['margin_auto']:.3f} | {r['knn10']:.3f} |"
        )
    c = result["corruption"]
    lines += [
        "",
        f"Corruption: mean rmd per severity ({c['n_per_severity']} test images per level; model fitted on "
        f"the clean-label {result['n']:,}-image training subset, shrinkage auto)",
        "",
        "| corruption | clean | 1 | 2 | 3 | 4 | 5 | Spearman (per sample) | Spearman (means) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kind in ("noise", "blur"):
        m = c[kind]["mean_rmd_by_severity_0_to_5"]
        lines.append(
            f"| gaussian {kind} | "
            + " | ".join(f"{v:.1f}" for v in m)
            + f" | {c[kind]['spearman_per_sample']:.3f} | {c[kind]['spearman_of_means']:.3f} |"
        )
    lines.append("")
    lines.append(
        f"Embedding: {result['embed_seconds']:.0f}s for {result['n']:,} training images; total {result['seconds']:.0f}s."
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=10000, help="training subset size")
    parser.add_argument("--sizes", default="1500,6000", help="smaller nested subsets also reported")
    parser.add_argument(
        "--test-n", type=int, default=500, help="test images per corruption severity"
    )
    parser.add_argument("--flip", type=float, default=0.10)
    parser.add_argument(
        "--work-dir", default="/tmp/fmnist-evidence", help="embedding cache (resumable)"
    )
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: all cores)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    work = Path(args.work_dir)
    encoder = load_encoder("efficientnet-lite0", device="auto")
    images, labels = fmnist.load_fashion_mnist("train")
    pick = fmnist.stratified_subset(labels, args.n, SEED)
    clean = labels[pick]
    noisy, flipped = fmnist.flip_labels(clean, args.flip, SEED)
    ids = [str(i) for i in pick]
    t0 = time.perf_counter()
    by_id = embed(
        fmnist.png_samples(images[pick], noisy, ids), encoder, work / f"train-{args.n}", "train"
    )
    embed_seconds = time.perf_counter() - t0
    features = np.stack([by_id[i] for i in ids])
    sizes = sorted({int(s) for s in args.sizes.split(",") if s} | {args.n})
    result = {
        "encoder": encoder.describe(),
        "n": args.n,
        "dim": int(features.shape[1]),
        "flip_fraction": args.flip,
        "embed_seconds": embed_seconds,
        "label_noise": label_noise(
            features, noisy, flipped, ids, [s for s in sizes if s <= args.n]
        ),
    }
    clean_model = fit(features, clean, ids, "auto")
    result["corruption"] = corruption(encoder, clean_model, work, args.test_n)
    result["seconds"] = time.perf_counter() - started
    result["command"] = " ".join(sys.argv)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2, default=float))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
