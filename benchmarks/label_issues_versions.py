"""The label-issue estimator against an earlier implementation of it, on the same real features.

    git worktree add /tmp/before <commit>
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/label_issues_versions.py \\
        --features fmnist-train-10000.npz --before /tmp/before --seed 0

Runs the fit job's label-issue path (fold models, rho by held-out log-loss, ``find_label_issues``
with the default noise model and refit, calibration) in a subprocess per code tree (this one and
``--before``), on the subsets and flips of ``benchmarks/label_issues_evidence.py`` (same seeds,
same flip seeds), and compares: AUROC for finding the flipped labels, precision at the noise
rate, the largest difference of ``label_issue_probability``, the share of equal suggestions, the
fitted T and rho. For a change meant to be a faster computation of the same estimator, the two
columns should agree to the tolerance of the optimisers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
NOISES = (("uniform", 0.05), ("uniform", 0.1), ("uniform", 0.2), ("confusion", 0.05), ("confusion", 0.1), ("confusion", 0.2))


def settings(features: Path, seed: int, sizes: list[int]):  # type: ignore[no-untyped-def]
    """(n, kind, rate, x, noisy labels, flipped, ids) as label_issues_evidence.py draws them."""
    sys.path.insert(0, str(HERE))
    import fmnist

    data = np.load(features)
    x_all = data["features"].astype(np.float64)
    x_all /= np.linalg.norm(x_all, axis=1, keepdims=True)
    clean, indices = data["labels"], data["indices"]
    order = np.random.default_rng(seed).permutation(x_all.shape[0])
    for n in sizes:
        pick = np.sort(order[:n])
        x, y_clean = x_all[pick], clean[pick]
        ids = [str(i) for i in indices[pick]]
        for kind, rate in NOISES:
            flip_seed = 1_000_003 * seed + 7919 * n + int(round(rate * 1000)) + (kind == "confusion") * 17
            flip = fmnist.flip_labels if kind == "uniform" else fmnist.flip_labels_confusion
            noisy, flipped = flip(y_clean, rate, flip_seed)
            yield n, kind, rate, x, noisy, flipped, ids


def worker(args: argparse.Namespace) -> int:
    """In the tree on sys.path: the label-issue fields of every setting, to an .npz."""
    from service.pipeline.fit_dataset import LABEL_ISSUE_REFITS, LABEL_NOISE_KIND
    from service.statistics import SufficientStatistics, assign_folds
    from service.statistics.label_issues import find_label_issues, noise_rows
    from service.statistics.selection import fold_gaussians, select_shrinkage_by_log_loss

    out = {}
    for n, kind, rate, x, noisy, flipped, ids in settings(Path(args.features), args.seed, args.sizes):
        labels = [str(v) for v in noisy]
        stats = SufficientStatistics(x.shape[1], normalized=True).update(x, labels, ids)
        folds = assign_folds(ids, stats.n_folds)
        models = fold_gaussians(stats)
        rows = noise_rows(n, 10_000)
        rho = select_shrinkage_by_log_loss(stats, x[rows], np.asarray(labels)[rows].tolist(), folds[rows], fold_models=models).best
        found = find_label_issues(stats, x, labels, folds, rho, kind=LABEL_NOISE_KIND, refits=LABEL_ISSUE_REFITS, fold_models=models)
        key = f"{n}-{kind}-{rate}"
        out[key + "-probability"] = found.issues.probability
        out[key + "-log_odds"] = found.issues.log_odds
        out[key + "-suggested"] = found.issues.suggested
        out[key + "-flipped"] = flipped
        out[key + "-fit"] = np.array([rho, found.noise.temperature])
    np.savez(args.output, **out)
    return 0


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    from scipy.stats import rankdata

    ranks = rankdata(score)
    p = int(positive.sum())
    return float((ranks[positive].sum() - p * (p + 1) / 2) / (p * (positive.size - p)))


def precision_at_rate(score: np.ndarray, positive: np.ndarray) -> float:
    top = np.argsort(-score, kind="stable")[: int(positive.sum())]
    return float(positive[top].mean())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", required=True)
    parser.add_argument("--before", default=None, help="a checkout of the earlier implementation (required)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sizes", type=lambda s: [int(v) for v in s.split(",")], default=[1000, 3000, 10000])
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if not args.before:
        parser.error("--before is required")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, tree in (("before", Path(args.before).resolve()), ("now", HERE.parent)):
            target = Path(tmp) / f"{name}.npz"
            env = dict(os.environ, PYTHONPATH=str(tree))
            command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--features", args.features,
                       "--seed", str(args.seed), "--sizes", ",".join(map(str, args.sizes)), "--output", str(target)]
            subprocess.run(command, env=env, check=True, cwd=tree)
            results[name] = dict(np.load(target))
    rows = []
    keys = sorted({k.rsplit("-", 1)[0] for k in results["now"]}, key=lambda s: (int(s.split("-")[0]), s))
    for key in keys:
        before, now = ({k: r[f"{key}-{k}"] for k in ("probability", "log_odds", "suggested", "flipped", "fit")} for r in (results["before"], results["now"]))
        flipped = now["flipped"].astype(bool)
        rows.append({
            "setting": key,
            "auroc_before": auroc(before["log_odds"], flipped), "auroc_now": auroc(now["log_odds"], flipped),
            "precision_before": precision_at_rate(before["log_odds"], flipped),
            "precision_now": precision_at_rate(now["log_odds"], flipped),
            "max_probability_difference": float(np.abs(before["probability"] - now["probability"]).max()),
            "suggestions_equal": float(np.mean(before["suggested"] == now["suggested"])),
            "rho_before": float(before["fit"][0]), "rho_now": float(now["fit"][0]),
            "temperature_before": float(before["fit"][1]), "temperature_now": float(now["fit"][1]),
        })  # fmt: skip
    print("| setting (N-noise-rate) | AUROC before | AUROC now | precision before | precision now | max abs diff of probability | equal suggestions | rho before / now | T before / now |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['auroc_before']:.4f} | {r['auroc_now']:.4f} | {r['precision_before']:.3f} | "
              f"{r['precision_now']:.3f} | {r['max_probability_difference']:.2e} | {r['suggestions_equal']:.4f} | "
              f"{r['rho_before']:g} / {r['rho_now']:g} | {r['temperature_before']:.3f} / {r['temperature_now']:.3f} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"seed": args.seed, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
