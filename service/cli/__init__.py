"""The ``difficulty`` console script. Each subcommand lives in the module that owns it; this
file only parses arguments and dispatches, importing lazily so ``--help`` stays fast."""

from __future__ import annotations

import argparse

from service.encoders.names import DEFAULT_ENCODER


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="difficulty", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP service (embedded default: SQLite + in-process worker)")
    serve.add_argument("--host", default=None, help="bind address (default 127.0.0.1; 0.0.0.0 only with API keys)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--data-dir", default=None, help="data directory (env DIFFICULTY_DATA_DIR)")
    serve.add_argument("--no-worker", action="store_true", help="do not run jobs in this process")

    worker = sub.add_parser("worker", help="run queued jobs (separate process; scale by running more)")
    worker.add_argument("--data-dir", default=None)
    worker.add_argument("--once", action="store_true", help="run at most one job, then exit")

    score = sub.add_parser("score", help="offline: score a dataset without a server (the fit job's table)")
    score.add_argument("source", nargs="?", help="image folder, archive, manifest or WebDataset shards")
    score.add_argument("--embeddings", help="precomputed features (.npy, N x D)")
    score.add_argument("--labels", help="labels for --embeddings (.npy ints, or text: one per line)")
    score.add_argument("--ids", help="sample IDs for --embeddings (text: one per line)")
    score.add_argument("--encoder", default=DEFAULT_ENCODER)
    score.add_argument(
        "--shrinkage",
        default="auto",
        help="'auto' (each covariance its own cross-validated rho), 'auto-shared' (one rho for "
        "both) or a number in [0, 1]; see docs/method.md",
    )
    score.add_argument("--no-normalize", action="store_true", help="do not L2-normalise features")
    score.add_argument("--knn-k", type=int, default=10, help="neighbors for the knn_agreement column")
    score.add_argument(
        "--knn-max-items", type=int, default=20_000, help="exact kNN up to this many samples; an approximate (inverted-file) index above"
    )
    score.add_argument(
        "--label-issues", default=None, metavar="CSV",
        help="also write the label-issue report (most likely first, with the disagreeing neighbors) here",
    )
    score.add_argument("--work-dir", default=None, help="where embeddings are kept (resumable)")
    score.add_argument("--device", default="auto")
    score.add_argument("--batch-size", type=int, default=None)
    score.add_argument("--top", type=int, default=10, help="rows in the printed summary")
    score.add_argument("-o", "--output", required=True, help=".parquet, .arrow or .csv")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        from service.api.server import serve_command

        return serve_command(args)
    if args.command == "worker":
        from service.jobs.worker import worker_command

        return worker_command(args)
    from service.cli.score import score_command

    return score_command(args)

