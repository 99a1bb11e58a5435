"""``difficulty score``: the main job without a server (embedded, files in, table out)."""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm import tqdm

from service.ingest.features import (
    InputError,
    check_lengths,
    load_embeddings,
    load_ids,
    load_labels,
)
from service.pipeline.fitting import fit_store
from service.statistics import FitError
from service.storage.embeddings import EmbeddingStore

CHUNK_ROWS = 65536


def parse_shrinkage(value: str) -> float | str:
    if value in ("auto", "auto-shared"):
        return value
    try:
        rho = float(value)
    except ValueError:
        raise InputError(f"--shrinkage must be 'auto', 'auto-shared' or a number in [0, 1], got {value!r}") from None
    if not 0.0 <= rho <= 1.0:
        raise InputError(f"--shrinkage must be in [0, 1], got {value}")
    return rho


def write_table(table: pa.Table, output: Path) -> None:
    suffix = output.suffix.lower()
    output.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".parquet":
        pq.write_table(table, output)
    elif suffix in (".arrow", ".feather", ".ipc"):
        with pa.OSFile(str(output), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table)
    elif suffix == ".csv":
        pacsv.write_csv(table, output)
    else:
        raise InputError(f"output must end in .parquet, .arrow or .csv, got {output.name!r}")


def store_embeddings(store: EmbeddingStore, features: np.ndarray, labels: list[str], ids: list[str]) -> None:
    with tqdm(total=len(ids), desc="store", unit="sample", file=sys.stderr) as bar:
        for index, start in enumerate(range(0, len(ids), CHUNK_ROWS)):
            stop = min(start + CHUNK_ROWS, len(ids))
            store.write_chunk(index, ids[start:stop], labels[start:stop], np.asarray(features[start:stop]))
            bar.update(stop - start)


def print_summary(table: pa.Table, top: int) -> None:
    rmd = table.column("rmd").to_numpy()
    order = np.argsort(-rmd, kind="stable")[:top]
    ids = table.column("sample_id").to_pylist()
    labels = table.column("label").to_pylist()
    predicted = table.column("predicted_label").to_pylist()
    suspects = sum(a != b for a, b in zip(labels, predicted, strict=True))
    print(f"scored {table.num_rows} samples; {suspects} ({suspects / max(table.num_rows, 1):.1%}) "
          "have predicted_label != label (suspected mislabels)")
    print(f"hardest {len(order)} (largest rmd):")
    for i in order:
        flag = "  <- predicted " + predicted[i] if predicted[i] != labels[i] else ""
        print(f"  {rmd[i]:10.3f}  {labels[i]:>12}  {ids[i]}{flag}")


def score_command(args: argparse.Namespace) -> int:
    try:
        shrinkage = parse_shrinkage(args.shrinkage)
        output = Path(args.output)
        if args.embeddings:
            if not args.labels:
                raise InputError("--embeddings needs --labels")
            features = load_embeddings(Path(args.embeddings))
            labels = load_labels(Path(args.labels))
            ids = load_ids(Path(args.ids)) if args.ids else [str(i) for i in range(features.shape[0])]
            check_lengths(features.shape[0], labels, ids)
            with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
                store = EmbeddingStore(Path(tmp))
                store_embeddings(store, features, labels, ids)
                table = _fit(store, not args.no_normalize, shrinkage)
        elif args.source:
            from service.pipeline.offline_images import embed_to_store

            store = embed_to_store(args)
            table = _fit(store, not args.no_normalize, shrinkage)
        else:
            raise InputError("give an image source (folder/archive/manifest) or --embeddings")
        write_table(table, output)
    except (InputError, FitError, ValueError, FileNotFoundError) as exc:
        print(f"difficulty score: error: {exc}", file=sys.stderr)
        return 2
    print_summary(table, args.top)
    print(f"wrote {output}")
    return 0


def _fit(store: EmbeddingStore, normalize: bool, shrinkage: float | str) -> pa.Table:
    with tqdm(desc="score", unit="sample", file=sys.stderr) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.n = done
            bar.refresh()

        return fit_store(store, normalize=normalize, shrinkage=shrinkage, progress=progress).scores
