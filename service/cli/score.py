"""``difficulty score``: the fit job without a server (files in, the same score table out).

Precomputed features or an image source go into an embedding store (temporary, or kept per
source and encoder under ``--work-dir`` so a second run resumes), then the fit use case the job
runs (``pipeline.fit_dataset.fit_and_score``) fits, scores and adds the neighbor column.
"""

from __future__ import annotations

import argparse
import atexit
import hashlib
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from tqdm import tqdm

from service.domain import JobStage
from service.errors import ServiceError
from service.ingest.features import check_lengths, load_embeddings, load_ids, load_labels
from service.pipeline.fit_dataset import FitOutcome, FitSettings, copy_embeddings, fit_and_score
from service.storage.embeddings import EmbeddingStore
from service.storage.scores import ISSUE_COLUMNS

CHUNK_ROWS = 65536
SHOW_FAILURES = 10


class UsageError(ServiceError):
    """A command line that cannot work as given."""


class Bars:
    """Stages drawn as one progress bar each, on stderr."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def set_stage(self, stage: JobStage, total: int | None) -> None:
        self.close()
        self.bar = tqdm(total=total, desc=str(stage), unit="", file=sys.stderr)

    def progress(self, done: int, total: int | None = None) -> None:
        if self.bar is not None:
            if total is not None:
                self.bar.total = total
            self.bar.n = done
            self.bar.refresh()

    def check(self) -> None:
        pass

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


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
        raise UsageError(f"output must end in .parquet, .arrow or .csv, got {output.name!r}")


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


def store_directory(work_dir: str | None, source: str, encoder_name: str) -> Path:
    """A stable directory per (source, encoder) under --work-dir, so that running the same
    command again resumes; without --work-dir a temporary directory removed at exit."""
    if work_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="difficulty-"))
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        return tmp
    key = hashlib.sha256(f"{Path(source).resolve()}\n{encoder_name}".encode()).hexdigest()[:16]
    return Path(work_dir) / f"embeddings-{key}"


def embeddings_to_store(args: argparse.Namespace, store: EmbeddingStore) -> None:
    if not args.labels:
        raise UsageError("--embeddings needs --labels")
    features = load_embeddings(Path(args.embeddings))
    labels = load_labels(Path(args.labels))
    ids = load_ids(Path(args.ids)) if args.ids else None
    check_lengths(features.shape[0], labels, ids)
    with tqdm(total=features.shape[0], desc="store", unit="sample", file=sys.stderr) as bar:
        copy_embeddings(
            store,
            features,
            np.asarray(labels, dtype=np.str_),
            None if ids is None else np.asarray(ids, dtype=np.str_),
            first_chunk=0,
            chunk_rows=CHUNK_ROWS,
            progress=lambda stop: bar.update(stop - bar.n),
        )


def images_to_store(args: argparse.Namespace) -> EmbeddingStore:
    from service.encoders import load_encoder
    from service.ingest import open_source
    from service.pipeline.embedding import embed_source

    source = open_source(args.source)
    encoder = load_encoder(args.encoder, device=args.device or "auto")
    store = EmbeddingStore(store_directory(args.work_dir, args.source, encoder.name))
    total = source.count()
    batch_size = args.batch_size or (256 if encoder.device.type == "cuda" else 64)
    print(f"embedding {source.description} with {encoder.name} ({encoder.dim}-d) on {encoder.device}", file=sys.stderr)
    with tqdm(total=total, desc="embed", unit="img", file=sys.stderr, smoothing=0.1) as bar:
        try:
            report = embed_source(
                source, encoder, store, total=total, batch_size=batch_size,
                progress=lambda done, _total: bar.update(done - bar.n),
            )
        except KeyboardInterrupt:
            hint = (
                f"finished chunks are kept in {store.directory}; run the same command to resume"
                if args.work_dir
                else "pass --work-dir DIR to keep finished chunks and resume"
            )
            print(f"\ninterrupted: {hint}", file=sys.stderr)
            raise SystemExit(130) from None
    failures = store.failures()
    print(
        f"embedded {report.embedded} new samples in {report.seconds:.1f}s ({report.per_second:.1f}/s); "
        f"{report.skipped_existing} already processed in an earlier run; {len(failures)} skipped as unusable",
        file=sys.stderr,
    )
    for sample_id, reason in failures[:SHOW_FAILURES]:
        print(f"  skipped {sample_id}: {reason}", file=sys.stderr)
    if len(failures) > SHOW_FAILURES:
        print(f"  ... and {len(failures) - SHOW_FAILURES} more (listed in the failure files of {store.directory})", file=sys.stderr)
    return store


def score_command(args: argparse.Namespace) -> int:
    bars = Bars()
    try:
        settings = FitSettings(
            normalize=not args.no_normalize,
            shrinkage=args.shrinkage,
            knn_k=max(1, args.knn_k),
            knn_max_items=args.knn_max_items,
        )
        output = Path(args.output)
        issues_output = Path(args.label_issues) if args.label_issues else None
        if issues_output is not None and issues_output.suffix.lower() != ".csv":
            raise UsageError(f"--label-issues must end in .csv, got {issues_output.name!r}")
        if args.embeddings:
            with tempfile.TemporaryDirectory(dir=args.work_dir) as tmp:
                store = EmbeddingStore(Path(tmp))
                embeddings_to_store(args, store)
                outcome = fit_and_score(store, settings, bars)
                report = label_issue_report(store, outcome, settings.knn_k) if issues_output else None
        elif args.source:
            store = images_to_store(args)
            outcome = fit_and_score(store, settings, bars)
            report = label_issue_report(store, outcome, settings.knn_k) if issues_output else None
        else:
            raise UsageError("give an image source (folder/archive/manifest) or --embeddings")
        bars.close()
        table = outcome.scores
        write_table(table, output)
        if issues_output is not None and report is not None:
            write_table(report, issues_output)
    except (ServiceError, ValueError, FileNotFoundError) as exc:
        bars.close()
        print(f"difficulty score: error: {exc}", file=sys.stderr)
        return 2
    print_summary(table, args.top)
    print(f"wrote {output}" + (f" and {issues_output}" if issues_output else ""))
    return 0


def label_issue_report(store: EmbeddingStore, outcome: FitOutcome, k: int) -> pa.Table:
    """The rows of the API's label-issue report (every sample, most likely issue first) with
    the IDs of each sample's nearest neighbors that carry another label, ';'-separated."""
    from service.pipeline.neighbors import load_neighbor_index

    scores = outcome.scores
    assert outcome.issue_log_odds is not None
    order = np.lexsort((scores.column("sample_id").to_numpy(zero_copy_only=False), -outcome.issue_log_odds))
    report = scores.select(list(ISSUE_COLUMNS)).take(pa.array(order))
    index = load_neighbor_index(store, outcome.num_chunks)
    disagreeing = []
    for sample_id, label in zip(report.column("sample_id").to_pylist(), report.column("label").to_pylist(), strict=True):
        neighbors = index.neighbors(sample_id, k) if sample_id in index.row_of else []
        disagreeing.append(";".join(n["sample_id"] for n in neighbors if n["label"] != label))
    return report.append_column("disagreeing_neighbors", pa.array(disagreeing, pa.string()))
