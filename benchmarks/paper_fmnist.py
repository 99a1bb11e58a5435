"""The paper's experiment, small: Fashion-MNIST, difficulty scores from EfficientNet-Lite0
features, CE vs label smoothing vs focal vs constant entropy regularisation vs
difficulty-aware entropy regularisation; mean and std over seeds of ACC, ECE, AURC.

Two steps:

1. ``prepare``: embed the Fashion-MNIST training images with the service's
   ``efficientnet-lite0`` encoder and fit/score them with the service's offline command
   (``difficulty score --embeddings``: the same fit code the server runs). Writes a scores
   parquet keyed by the row index, the IDs the trainer uses for Fashion-MNIST.
   (Equivalently: upload to a running service and pass ``--service-url --dataset-id`` to run.)

       python benchmarks/paper_fmnist.py prepare --device cuda -o scores/fmnist_efflite0.parquet

2. ``run``: train every method on every seed (hyper-parameter grids included), choose each
   method's hyper-parameters by the mean validation NLL (a held-out part of the training
   split; the test set is never used to choose), and write the table, the full grid and a plot.

       python benchmarks/paper_fmnist.py run --scores-file scores/fmnist_efflite0.parquet \\
           --device cuda --epochs 15 --seeds 0 1 2 --jobs 8 --out-dir docs --tag full
       python benchmarks/paper_fmnist.py run --service-url http://127.0.0.1:8000 --dataset-id ID ...
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from trainer.data import ScoreTable  # noqa: E402
from trainer.train import TrainConfig, fmnist_train_indices  # noqa: E402
from trainer.weights import DEFAULT_MAPPING, MAPPING_NAMES, map_scores  # noqa: E402

METHOD_LABELS = {
    "ce": "Cross-entropy",
    "ls": "Label smoothing",
    "focal": "Focal loss",
    "er": "Constant ER (confidence penalty)",
    "difficulty": "Difficulty-aware ER (paper)",
    "er-matched": "Constant ER at the difficulty-aware run's average penalty",
}
REPORTED = ("accuracy", "ece", "aurc", "nll", "adaptive_ece", "eaurc", "misclassification_auroc")


# -- prepare: EfficientNet-Lite0 features -> service fit -> scores ----------------------------


def prepare(args: argparse.Namespace) -> None:
    import torch
    from PIL import Image

    from service.encoders import load_encoder
    from trainer.fmnist import load_fashion_mnist

    torch.set_num_threads(args.threads or torch.get_num_threads())
    images, labels = load_fashion_mnist("train", args.fmnist_dir)
    rows = np.arange(len(labels))
    if args.train_subset:
        # Reduced runs: embed and fit only the rows the trainer will train on.
        rows = fmnist_train_indices(len(labels), args.train_subset, args.val_size)[0]
    encoder = load_encoder("efficientnet-lite0", device=args.device)
    print(f"encoder {encoder.name} on {encoder.device}, {len(rows)} images", flush=True)

    def preprocess(i: int):
        # Same as the service's decode path for a grayscale PNG: to RGB, then the encoder's
        # own preprocessing (resize 256 bicubic, centre crop 224, normalise).
        return encoder.preprocess(Image.fromarray(images[i]).convert("RGB"))

    start = time.perf_counter()
    feats = []
    with ThreadPoolExecutor(args.workers) as pool:
        for begin in range(0, len(rows), args.batch_size):
            batch = list(pool.map(preprocess, rows[begin : begin + args.batch_size]))
            feats.append(encoder.embed(torch.stack(batch)))
            if (begin // args.batch_size) % 20 == 0:
                print(f"  embedded {begin + len(batch)}/{len(rows)}", flush=True)
    features = np.concatenate(feats).astype(np.float32)
    embed_seconds = time.perf_counter() - start
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        np.save(Path(tmp) / "f.npy", features)
        np.save(Path(tmp) / "y.npy", labels[rows])
        (Path(tmp) / "ids.txt").write_text("\n".join(str(i) for i in rows) + "\n")
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "service.cli", "score", "--embeddings", f"{tmp}/f.npy",
             "--labels", f"{tmp}/y.npy", "--ids", f"{tmp}/ids.txt", "--shrinkage", args.shrinkage,
             "-o", str(output)],
            check=True, cwd=ROOT,
        )  # fmt: skip
        fit_seconds = time.perf_counter() - start
    meta = {
        "encoder": encoder.describe(),
        "num_samples": int(len(rows)),
        "subset": bool(args.train_subset),
        "shrinkage": args.shrinkage,
        "embed_seconds": embed_seconds,
        "embed_images_per_second": len(rows) / embed_seconds,
        "fit_seconds": fit_seconds,
        "device": str(encoder.device),
    }
    output.with_suffix(".json").write_text(json.dumps(meta, indent=2) + "\n")
    print(json.dumps(meta, indent=2))


# -- run: the grid over methods x hyper-parameters x seeds --------------------------------------


def _runs(args: argparse.Namespace, scores: np.ndarray) -> list[dict[str, Any]]:
    grid: list[tuple[str, dict[str, Any]]] = [("ce", {})]
    grid += [("ls", {"smoothing": v}) for v in args.ls_grid]
    grid += [("focal", {"gamma": v}) for v in args.focal_grid]
    grid += [("er", {"beta": v}) for v in args.er_grid]
    matched = []
    for clip in args.clip_grid:
        quantile = None if clip == "none" else float(clip)
        table = ScoreTable([str(i) for i in range(len(scores))], scores)
        capped = (table if quantile is None else table.clipped(quantile)).scores
        for spec in args.mapping_grid:
            # NAME or NAME:T; T "auto" (or none) = the mapping's default (exp-max: std).
            name, _, t_text = spec.partition(":")
            if name not in MAPPING_NAMES:
                raise SystemExit(f"--mapping-grid: unknown mapping {name!r} ({', '.join(MAPPING_NAMES)})")
            temperature: float | str = "auto" if t_text in ("", "auto") else float(t_text)
            mapped = map_scores(capped, name, temperature=temperature)
            for alpha in args.alpha_grid:
                grid.append(("difficulty", {
                    "alpha": alpha, "mapping": name, "temperature": temperature,
                    "t_resolved": mapped.params.get("temperature"), "clip_quantile": quantile,
                    "mean_weight": mapped.mean_weight,
                }))  # fmt: skip
                # Constant ER at the same average penalty, for the matched comparison.
                matched.append(("er", {"beta": alpha * mapped.mean_weight, "matched": True}))
    if args.matched_er:
        grid += list({json.dumps(p, sort_keys=True): (m, p) for m, p in matched}.values())
    grid = [(m, p) for m, p in grid if m in args.methods]
    # Seed-major: if the time budget runs out, every configuration has the same seeds done.
    return [
        {"method": method, "params": params, "seed": seed}
        for seed in args.seeds
        for method, params in grid
    ]


def _config(run: dict[str, Any], args: argparse.Namespace, scores_file: str | None) -> TrainConfig:
    params = {k: v for k, v in run["params"].items() if k not in ("t_resolved", "mean_weight", "matched")}
    return TrainConfig(
        data="fmnist", fmnist_dir=args.fmnist_dir, train_subset=args.train_subset,
        val_size=args.val_size, test_subset=args.test_subset, model=args.model,
        epochs=args.epochs, batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr,
        schedule=args.schedule, augment=args.augment, loss=run["method"], seed=run["seed"],
        device=args.device, ood="noise", progress=False, threads=args.threads,
        scores_file=scores_file if run["method"] == "difficulty" else None, **params,
    )  # fmt: skip


def _train_one(cfg_dict: dict[str, Any]) -> dict[str, Any]:
    from trainer.train import TrainConfig as Cfg
    from trainer.train import train

    report = train(Cfg(**cfg_dict))
    return {
        "test": report["metrics"],
        "val": report["val_metrics"],
        "seconds": report["train"]["seconds"],
        "device": report["environment"]["device"],
    }


def _scores(args: argparse.Namespace, workdir: Path) -> tuple[str, dict[str, Any], np.ndarray]:
    import pyarrow as pa
    import pyarrow.ipc as ipc

    from trainer.data import read_table

    if args.scores_file:
        table = read_table(args.scores_file)
        meta_path = Path(args.scores_file).with_suffix(".json")
        source: dict[str, Any] = {"source": "file", "path": args.scores_file}
        if meta_path.exists():
            source["prepare"] = json.loads(meta_path.read_text())
        path = args.scores_file
    else:
        from trainer.client import DifficultyClient

        with DifficultyClient(args.service_url, args.api_key) as client:
            fetched = client.fetch_scores(args.dataset_id)
        table = fetched.table
        source = {"source": "service", "service_url": args.service_url, "dataset_id": args.dataset_id,
                  "fit_id": fetched.fit_id, "encoder": fetched.dataset.get("encoder")}  # fmt: skip
        # Fetched once here; the training processes read this copy instead of each asking.
        path = str(workdir / "scores.arrow")
        with pa.OSFile(path, "wb") as sink, ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    scores = table.column("rmd").to_numpy(zero_copy_only=False).astype(np.float64)
    source["num_scores"] = len(scores)
    return path, source, scores


def _mean_std(values: list[float]) -> tuple[float, float]:
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def _params_text(method: str, params: dict[str, Any]) -> str:
    if method == "ls":
        return f"eps={params['smoothing']}"
    if method == "focal":
        return f"gamma={params['gamma']}"
    if method == "er":
        return f"beta={params['beta']:.3g}" + (" (matched to a difficulty-aware run)" if params.get("matched") else "")
    if method == "difficulty":
        t = params.get("t_resolved")
        t_text = "" if t is None else f", T={t:.3g}" + (" (auto)" if params["temperature"] == "auto" else "")
        clip = params.get("clip_quantile")
        clip_text = "" if clip is None else f", scores capped at q{clip:g}"
        return (f"alpha={params['alpha']}, {params['mapping']}{t_text}{clip_text}, "
                f"mean w={params.get('mean_weight', float('nan')):.2g}")  # fmt: skip
    return "-"


def summarise(results: list[dict[str, Any]], select_by: str) -> dict[str, Any]:
    """Group by (method, params) over seeds; choose each method's params by mean val metric."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["method"], json.dumps(r["params"], sort_keys=True)), []).append(r)
    rows = []
    for (method, params_json), runs in groups.items():
        row = {
            "method": method,
            "params": json.loads(params_json),
            "seeds": [r["seed"] for r in runs],
        }
        for name in REPORTED:
            row[name] = _mean_std([r["test"][name] for r in runs])
        row["val_" + select_by] = statistics.fmean(r["val"][select_by] for r in runs)
        rows.append(row)
    lower_is_better = select_by not in ("accuracy", "misclassification_auroc")
    selected = {}
    for method in METHOD_LABELS:
        # The matched ER runs compete in ER's own choice too (they are ER runs).
        candidates = [r for r in rows if r["method"] == method]
        if candidates:
            key = (
                (lambda r: r["val_" + select_by])
                if lower_is_better
                else (lambda r: -r["val_" + select_by])
            )
            selected[method] = min(candidates, key=key)
    da = selected.get("difficulty")
    if da is not None:
        beta = da["params"]["alpha"] * da["params"]["mean_weight"]
        for r in rows:
            if r["method"] == "er" and r["params"].get("matched") and abs(r["params"]["beta"] - beta) < 1e-12:
                selected["er-matched"] = r
    return {"grid": rows, "selected": selected}


def markdown(summary: dict[str, Any], meta: dict[str, Any]) -> str:
    def cell(ms: tuple[float, float], scale: float, digits: int) -> str:
        return f"{ms[0] * scale:.{digits}f} ± {ms[1] * scale:.{digits}f}"

    lines = [
        f"Seeds: {meta['seeds']}; selection: lowest mean validation {meta['select_by']} "
        f"({meta['val_size']} held-out training images); test: {meta['test_samples']} images.",
        "",
        "| method | hyper-parameters (chosen on validation) | seeds | ACC % ↑ | ECE % ↓ | AURC ‰ ↓ | NLL ↓ |",
        "|---|---|---|---|---|---|---|",
    ]
    for method, row in summary["selected"].items():
        lines.append(
            f"| {METHOD_LABELS[method]} | {_params_text(row['method'], row['params'])} | {len(row['seeds'])} | "
            f"{cell(row['accuracy'], 100, 2)} | {cell(row['ece'], 100, 2)} | "
            f"{cell(row['aurc'], 1000, 2)} | {cell(row['nll'], 1, 4)} |"
        )
    lines += [
        "",
        "Every configuration tried (test metrics, mean ± std over seeds; val column = selection criterion):",
        "",
        f"| method | hyper-parameters | val {meta['select_by']} | ACC % | ECE % | AURC ‰ | adaptive ECE % | misclass. AUROC |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["grid"]:
        lines.append(
            f"| {row['method']} | {_params_text(row['method'], row['params'])} | "
            f"{row['val_' + meta['select_by']]:.4f} | {cell(row['accuracy'], 100, 2)} | "
            f"{cell(row['ece'], 100, 2)} | {cell(row['aurc'], 1000, 2)} | "
            f"{cell(row['adaptive_ece'], 100, 2)} | {cell(row['misclassification_auroc'], 1, 4)} |"
        )
    return "\n".join(lines) + "\n"


def plot(summary: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    selected = summary["selected"]
    names = [METHOD_LABELS[m].split(" (")[0] for m in selected]
    palette = {
        "ce": "tab:gray",
        "ls": "tab:blue",
        "focal": "tab:orange",
        "er": "tab:purple",
        "difficulty": "tab:red",
        "er-matched": "tab:pink",
    }
    colors = [palette[m] for m in selected]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    for ax, (metric, scale, label) in zip(
        axes, [("accuracy", 100, "ACC % (higher is better)"), ("ece", 100, "ECE % (lower is better)"),
               ("aurc", 1000, "AURC ‰ (lower is better)")], strict=True,
    ):  # fmt: skip
        means = [selected[m][metric][0] * scale for m in selected]
        stds = [selected[m][metric][1] * scale for m in selected]
        ax.bar(range(len(names)), means, yerr=stds, color=colors, capsize=4, edgecolor="black")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
        low = min(m - s for m, s in zip(means, stds, strict=True))
        high = max(m + s for m, s in zip(means, stds, strict=True))
        pad = (high - low) * 0.3 + 1e-9
        ax.set_ylim(max(0.0, low - pad), high + pad)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> None:
    if not args.scores_file and not (args.service_url and args.dataset_id):
        raise SystemExit("give --scores-file, or --service-url and --dataset-id")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"paper_fmnist_{args.tag}"
    with tempfile.TemporaryDirectory() as tmp:
        scores_path, source, scores = _scores(args, Path(tmp))
        runs = _runs(args, scores)
        print(f"{len(runs)} training runs ({args.jobs} at a time) on {args.device}", flush=True)
        start = time.perf_counter()
        configs = [asdict(_config(r, args, scores_path)) for r in runs]
        results = _execute(runs, configs, args, start)
        wall = time.perf_counter() - start
    summary = summarise(results, args.select_by)
    meta = {
        "tag": args.tag,
        "seeds": args.seeds,
        "select_by": args.select_by,
        "val_size": args.val_size,
        "train_subset": args.train_subset or (60000 - args.val_size),
        "test_samples": args.test_subset or 10000,
        "model": args.model,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "optimizer": args.optimizer,
        "lr": args.lr,
        "schedule": args.schedule,
        "augment": args.augment,
        "device": results[0]["device"] if results else args.device,
        "score_std": float(scores.std()),
        "scores": source,
        "wall_seconds": wall,
        "grids": {
            "ls": args.ls_grid,
            "focal": args.focal_grid,
            "er": args.er_grid,
            "alpha": args.alpha_grid,
            "mappings": args.mapping_grid,
            "clip": args.clip_grid,
            "matched_er": args.matched_er,
        },  # fmt: skip
    }
    table = markdown(summary, meta)
    (out_dir / f"{stem}.md").write_text(table)
    (out_dir / f"{stem}.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "runs": results}, indent=2, default=float)
        + "\n"
    )
    title = (f"Fashion-MNIST ({args.tag}): {meta['train_subset']} train, {args.model}, {args.epochs} epochs, "
             f"seeds {args.seeds}; mean ± std")  # fmt: skip
    plot(summary, out_dir / f"{stem}.png", title)
    print(table)
    print(f"wrote {out_dir / stem}.md/.json/.png in {wall:.0f} s")


def _execute(
    runs: list[dict[str, Any]],
    configs: list[dict[str, Any]],
    args: argparse.Namespace,
    start: float,
) -> list[dict[str, Any]]:
    """Run the trainings (``--jobs`` processes); past ``--time-budget`` seconds, start no more
    and report what finished (the table then says how many seeds each configuration has)."""
    results: list[dict[str, Any]] = []
    budget = args.time_budget or float("inf")
    if args.jobs <= 1:
        for run_spec, cfg in zip(runs, configs, strict=True):
            if time.perf_counter() - start > budget:
                print("time budget reached: stopping early", flush=True)
                break
            results.append({**run_spec, **_train_one(cfg)})
            _progress(results, len(runs), start)
        return results
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, wait

    ctx = multiprocessing.get_context("spawn")  # CUDA cannot be forked
    with ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
        pending = {
            pool.submit(_train_one, cfg): spec for spec, cfg in zip(runs, configs, strict=True)
        }
        while pending:
            done, _ = wait(pending, timeout=5, return_when=FIRST_COMPLETED)
            for future in done:
                spec = pending.pop(future)
                if not future.cancelled():
                    results.append({**spec, **future.result()})
                    _progress(results, len(runs), start)
            if time.perf_counter() - start > budget:
                cancelled = sum(f.cancel() for f in list(pending))
                if cancelled:
                    print(f"time budget reached: {cancelled} runs not started", flush=True)
                pending = {f: s for f, s in pending.items() if not f.cancelled()}
    return results


def _progress(results: list[dict[str, Any]], total: int, start: float) -> None:
    r = results[-1]
    print(
        f"[{len(results)}/{total} {time.perf_counter() - start:.0f}s] {r['method']} {r['params']} seed {r['seed']}: "
        f"acc {r['test']['accuracy']:.4f} ece {r['test']['ece']:.4f} val nll {r['val']['nll']:.4f}",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--fmnist-dir", default=None)
    common.add_argument(
        "--train-subset", type=int, default=None, help="reduced runs: train on this many"
    )
    common.add_argument("--val-size", type=int, default=5000)
    common.add_argument("--device", default="auto")
    common.add_argument("--threads", type=int, default=None)

    p = sub.add_parser(
        "prepare", parents=[common], help="EfficientNet-Lite0 features -> scores parquet"
    )
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 2, help="preprocessing threads")
    p.add_argument("--shrinkage", default="auto")

    r = sub.add_parser(
        "run", parents=[common], help="train all methods x seeds, write table + plot"
    )
    r.add_argument("--scores-file")
    r.add_argument("--service-url")
    r.add_argument("--dataset-id")
    r.add_argument("--api-key", default=os.environ.get("DIFFICULTY_API_KEY"))
    r.add_argument("--test-subset", type=int, default=None)
    r.add_argument("--model", default="small-cnn")
    r.add_argument("--epochs", type=int, default=15)
    r.add_argument("--batch-size", type=int, default=128)
    r.add_argument("--optimizer", default="sgd")
    r.add_argument("--lr", type=float, default=None)
    r.add_argument("--schedule", default="cosine")
    r.add_argument("--augment", action="store_true")
    r.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    r.add_argument("--ls-grid", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    r.add_argument("--focal-grid", type=float, nargs="+", default=[1.0, 2.0, 3.0])
    r.add_argument("--er-grid", type=float, nargs="+", default=[0.1, 0.3, 1.0])
    r.add_argument("--alpha-grid", type=float, nargs="+", default=[0.3, 1.0, 3.0])
    r.add_argument("--mapping-grid", nargs="+", default=[DEFAULT_MAPPING],
                   help="weight mappings as NAME or NAME:T (T 'auto' = the mapping's default), "
                        f"e.g. rank:0.3 exp-max:auto; default: {DEFAULT_MAPPING} at its default T")  # fmt: skip
    r.add_argument("--clip-grid", nargs="+", default=["none"],
                   help="score caps before the mapping: 'none' or quantiles (e.g. 0.99)")  # fmt: skip
    r.add_argument("--no-matched-er", dest="matched_er", action="store_false",
                   help="skip constant ER at each difficulty-aware run's average penalty")  # fmt: skip
    r.add_argument("--methods", nargs="+", default=list(METHOD_LABELS), choices=list(METHOD_LABELS))
    r.add_argument(
        "--select-by", default="nll", choices=("nll", "ece", "accuracy", "aurc", "brier")
    )
    r.add_argument("--jobs", type=int, default=1, help="training processes at a time")
    r.add_argument(
        "--time-budget", type=float, default=None, help="seconds; then start no more runs"
    )
    r.add_argument("--out-dir", default="docs")
    r.add_argument("--tag", default="full")
    args = parser.parse_args()
    if args.command == "prepare":
        prepare(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
