"""The image path of ``difficulty score``: read a source, embed it into a chunk store, report."""

from __future__ import annotations

import argparse
import atexit
import hashlib
import shutil
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

from service.encoders import load_encoder
from service.ingest import open_source
from service.pipeline.embedding import EmbedReport, embed_source, read_failures
from service.storage.embeddings import EmbeddingStore

SHOW_FAILURES = 10


def store_directory(work_dir: str | None, source: str, encoder_name: str) -> Path:
    """A stable directory per (source, encoder) under --work-dir, so that running the same
    command again resumes; without --work-dir a temporary directory removed at exit."""
    if work_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="difficulty-"))
        atexit.register(shutil.rmtree, tmp, ignore_errors=True)
        return tmp
    key = hashlib.sha256(f"{Path(source).resolve()}\n{encoder_name}".encode()).hexdigest()[:16]
    return Path(work_dir) / f"embeddings-{key}"


def embed_to_store(args: argparse.Namespace) -> EmbeddingStore:
    source = open_source(args.source)
    encoder = load_encoder(args.encoder, device=getattr(args, "device", "auto") or "auto")
    store = EmbeddingStore(store_directory(getattr(args, "work_dir", None), args.source, encoder.name))
    total = source.count()
    batch_size = getattr(args, "batch_size", None) or (256 if encoder.device.type == "cuda" else 64)
    print(
        f"embedding {source.description} with {encoder.name} ({encoder.dim}-d) on {encoder.device}",
        file=sys.stderr,
    )
    with tqdm(total=total, desc="embed", unit="img", file=sys.stderr, smoothing=0.1) as bar:

        def progress(done: int, total_: int | None) -> None:
            bar.update(done - bar.n)

        try:
            report = embed_source(source, encoder, store, total=total, batch_size=batch_size, progress=progress)
        except KeyboardInterrupt:
            hint = (
                f"finished chunks are kept in {store.directory}; run the same command to resume"
                if getattr(args, "work_dir", None)
                else "pass --work-dir DIR to keep finished chunks and resume"
            )
            print(f"\ninterrupted: {hint}", file=sys.stderr)
            raise SystemExit(130) from None
    print_embed_report(report, store)
    return store


def print_embed_report(report: EmbedReport, store: EmbeddingStore) -> None:
    failures = read_failures(store.directory)
    print(
        f"embedded {report.embedded} new samples in {report.seconds:.1f}s "
        f"({report.per_second:.1f}/s); {report.skipped_existing} already processed in an earlier run; "
        f"{len(failures)} skipped as unusable",
        file=sys.stderr,
    )
    for sample_id, reason in failures[:SHOW_FAILURES]:
        print(f"  skipped {sample_id}: {reason}", file=sys.stderr)
    if len(failures) > SHOW_FAILURES:
        print(f"  ... and {len(failures) - SHOW_FAILURES} more (failures-*.json in {store.directory})", file=sys.stderr)
