"""``difficulty-train``: train a classifier with difficulty-aware entropy regularisation.

Examples:
  difficulty-train --data fmnist --loss difficulty --service-url http://127.0.0.1:8000 \\
      --dataset-id 3f2a... --mapping quantile --alpha 1 --epochs 10 --compare ce -o runs/da
  difficulty-train --data ./images/train --test-data ./images/test --model resnet18 \\
      --loss difficulty --scores-file scores.parquet -o runs/da
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from trainer.data import MISSING_POLICIES
from trainer.losses import DEFAULT_ALPHA, LOSS_NAMES
from trainer.models import MODEL_NAMES
from trainer.train import TrainConfig, train_with_comparison
from trainer.weights import DEFAULT_MAPPING, MAPPING_NAMES, QUANTILE_HIGH, QUANTILE_LOW, RANK_T


def _temperature(value: str) -> float | str:
    if value == "auto":
        return "auto"
    t = float(value)
    if not math.isfinite(t) or t <= 0:
        raise argparse.ArgumentTypeError("temperature must be 'auto' or a positive number")
    return t


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="difficulty-train",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = p.add_argument_group("data")
    d.add_argument(
        "--data",
        default="fmnist",
        help="'fmnist' (Debian package dataset-fashion-mnist) or an ImageFolder directory",
    )
    d.add_argument(
        "--test-data", help="ImageFolder for testing (default: hold out --test-fraction)"
    )
    d.add_argument("--test-fraction", type=float, default=0.2)
    d.add_argument(
        "--fmnist-dir", help="folder of the Fashion-MNIST IDX files (env FASHION_MNIST_DIR)"
    )
    d.add_argument("--train-subset", type=int, help="train on a fixed random subset of this size")
    d.add_argument("--test-subset", type=int)
    d.add_argument("--val-size", type=int, default=0,
                   help="hold this many training samples out and report val_metrics (for tuning)")  # fmt: skip
    d.add_argument(
        "--image-size", type=int, default=32, help="ImageFolder images are resized to this"
    )
    d.add_argument("--grayscale", action="store_true", help="ImageFolder images as 1 channel")
    d.add_argument("--augment", action="store_true", help="random flips and 2-pixel shifts")
    d.add_argument(
        "--ood",
        default="noise",
        help="'noise' (synthetic), 'none', or an ImageFolder of OOD images",
    )

    m = p.add_argument_group("model and optimisation")
    m.add_argument("--model", choices=MODEL_NAMES, default="small-cnn")
    m.add_argument("--epochs", type=int, default=1)
    m.add_argument("--batch-size", type=int, default=128)
    m.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), default="sgd")
    m.add_argument("--lr", type=float, help="default 0.05 (sgd) or 1e-3 (adam/adamw)")
    m.add_argument("--momentum", type=float, default=0.9)
    m.add_argument("--weight-decay", type=float, default=5e-4)
    m.add_argument("--schedule", choices=("cosine", "step", "none"), default="cosine")

    lo = p.add_argument_group("loss")
    lo.add_argument("--loss", choices=LOSS_NAMES, default="difficulty",
                    help="ce, ls (label smoothing), focal, er (constant entropy regularisation), difficulty")  # fmt: skip
    lo.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                    help=f"difficulty-aware: entropy weight (default {DEFAULT_ALPHA:g})")  # fmt: skip
    lo.add_argument("--mapping", choices=MAPPING_NAMES, default=DEFAULT_MAPPING,
                    help=f"difficulty-aware: scores -> weights in [0, 1] (default {DEFAULT_MAPPING}): "
                         "quantile (min-max between two quantiles), rank exp((rank/N - 1)/T), "
                         "robust-sigmoid, exp-max (the original exp((s - max s)/T), degenerate on "
                         "heavy-tailed scores)")  # fmt: skip
    lo.add_argument("--temperature", "-T", type=_temperature, default="auto",
                    help=f"rank, robust-sigmoid, exp-max: T; 'auto' = the mapping's default (rank "
                         f"{RANK_T:g}, robust-sigmoid 1, exp-max the std of the scores)")  # fmt: skip
    lo.add_argument("--quantile-low", type=float,
                    help=f"quantile mapping: lower cap (default {QUANTILE_LOW:g})")  # fmt: skip
    lo.add_argument("--quantile-high", type=float,
                    help=f"quantile mapping: upper cap (default {QUANTILE_HIGH:g})")  # fmt: skip
    lo.add_argument("--compare", nargs="*", default=[], choices=LOSS_NAMES, metavar="LOSS",
                    help="also train these losses (e.g. ce) on the same data and seed: their metrics "
                         "in the report, reliability diagrams side by side")  # fmt: skip
    lo.add_argument("--smoothing", type=float, default=0.1, help="label smoothing epsilon")
    lo.add_argument("--gamma", type=float, default=3.0, help="focal loss gamma")
    lo.add_argument(
        "--beta", type=float, default=0.1, help="constant entropy regularisation weight"
    )

    s = p.add_argument_group("difficulty scores (for --loss difficulty)")
    s.add_argument(
        "--service-url", default=os.environ.get("DIFFICULTY_URL"), help="env DIFFICULTY_URL"
    )
    s.add_argument("--dataset-id")
    s.add_argument(
        "--api-key", default=os.environ.get("DIFFICULTY_API_KEY"), help="env DIFFICULTY_API_KEY"
    )
    s.add_argument(
        "--scores-file", help="offline: table from `difficulty score` (.parquet/.arrow/.csv)"
    )
    s.add_argument("--score-column", default="rmd", help="rmd (default) or rmd_min")
    s.add_argument("--clip-quantile", type=float, default=None,
                   help="opt-in: cap scores at this quantile (e.g. 0.99) before the mapping "
                        "(matters for exp-max; quantile caps by itself, rank is unchanged by a cap)")  # fmt: skip
    s.add_argument("--missing-scores", choices=MISSING_POLICIES, default="error",
                   help="samples without a score: error (default), drop, or zero-weight (plain CE)")  # fmt: skip
    s.add_argument("--cache-dir", help="score cache (default ~/.cache/difficulty-trainer)")

    r = p.add_argument_group("run")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1")
    r.add_argument("--workers", type=int, default=0, help="DataLoader workers (ImageFolder)")
    r.add_argument("--threads", type=int, help="torch CPU threads")
    r.add_argument("--no-progress", action="store_true")
    r.add_argument(
        "-o", "--output-dir", required=True, help="report.json and reliability.png go here"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = TrainConfig(
        data=args.data, test_data=args.test_data, test_fraction=args.test_fraction,
        fmnist_dir=args.fmnist_dir, train_subset=args.train_subset, val_size=args.val_size, test_subset=args.test_subset,
        image_size=args.image_size, grayscale=args.grayscale, augment=args.augment, ood=args.ood,
        model=args.model, epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer,
        lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay, schedule=args.schedule,
        loss=args.loss, alpha=args.alpha, mapping=args.mapping, temperature=args.temperature,
        quantile_low=args.quantile_low, quantile_high=args.quantile_high, smoothing=args.smoothing,
        gamma=args.gamma, beta=args.beta, service_url=args.service_url, dataset_id=args.dataset_id,
        api_key=args.api_key, scores_file=args.scores_file, score_column=args.score_column, clip_quantile=args.clip_quantile,
        missing=args.missing_scores, cache_dir=args.cache_dir, seed=args.seed, device=args.device,
        workers=args.workers, threads=args.threads, progress=not args.no_progress,
        output_dir=args.output_dir,
    )  # fmt: skip
    from trainer.client import DifficultyClientError

    try:
        report = train_with_comparison(cfg, args.compare)
    except (DifficultyClientError, ValueError, KeyError, FileNotFoundError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"difficulty-train: error: {message}", file=sys.stderr)
        return 2
    def rounded(metrics: dict) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in metrics.items()}

    print(json.dumps(rounded(report["metrics"])))
    for name, other in report.get("compare", {}).items():
        print(json.dumps({"compare": name, **rounded(other["metrics"])}))
    print(f"wrote {os.path.join(args.output_dir, 'report.json')} and reliability.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
