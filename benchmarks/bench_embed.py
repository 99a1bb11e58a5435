"""Embedding throughput, side by side in one run (absolute numbers drift on shared machines):

Floor and end-to-end alternate for ``--rounds`` rounds; the table gives medians, and e2e / floor
is the median of the per-round ratios (with its range), since absolute rates drift on shared machines.

- floor:      the encoder's forward pass alone on preloaded, preprocessed tensors (on the device);
- end-to-end: JPEG files on disk -> open_source -> decode workers (GPU nvJPEG on CUDA) ->
              batches -> forward -> chunk store, i.e. ``embed_source`` exactly as the service runs;
- naive:      one Python thread: PIL open + the encoder's preprocessing + forward, batch at a time;
- feed:       end-to-end with the forward pass replaced by a no-op (``FeedOnly``): the rate at which
              the pipeline (read, decode, preprocess, copy, store) can feed a model, its ceiling.
              Where feed >> floor, the model sets the pace; where feed ~ end-to-end, the host does.
- stages:     per image on one thread: JPEG decode, the encoder's preprocessing, and the header
              check alone (all a CUDA run with nvJPEG leaves to the host), in ms.

CPU (this machine):
    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_embed.py \
        --encoders open_clip:ViT-S-32:random,efficientnet-lite0 --n 256 --out docs/bench-embed-cpu
GPU (benchmarks/gpu_check.sh runs it):
    python3 benchmarks/bench_embed.py --device cuda --encoders open_clip:ViT-B-16:random \
        --n 4096 --batch-size 512 --out "$OUT"
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from service.encoders import Encoder, load_encoder
from service.ingest import open_source
from service.pipeline.decode import decode_image, open_image
from service.pipeline.embedding import embed_source
from service.storage.embeddings import EmbeddingStore


def synthetic_photo(rng: np.random.Generator, size: tuple[int, int]) -> Image.Image:
    """Smooth colour fields plus texture: compresses and decodes like a photo, unlike noise."""
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    channels = []
    for _ in range(3):
        a, b, c, d = rng.uniform(0.5, 6, 4)
        channels.append(np.sin(a * xx * np.pi + b) * np.cos(c * yy * np.pi + d))
    image = (np.stack(channels, -1) * 90 + 128 + rng.normal(0, 12, (h, w, 3))).clip(0, 255)
    return Image.fromarray(image.astype(np.uint8))


def write_images(root: Path, n: int, size: tuple[int, int], seed: int = 0) -> Path:
    """``n`` JPEGs in ImageFolder layout (4 classes). Real photos from skimage when present."""
    rng = np.random.default_rng(seed)
    photos: list[Image.Image] = []
    try:
        from skimage import data as skdata

        for name in (
            "astronaut",
            "coffee",
            "chelsea",
            "rocket",
            "motorcycle_left",
            "hubble_deep_field",
        ):
            try:
                photos.append(Image.fromarray(getattr(skdata, name)()).convert("RGB"))
            except Exception:
                continue
    except ImportError:
        pass
    for i in range(n):
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        if photos:
            base = photos[i % len(photos)]
            w, h = base.size
            cw, ch = int(w * rng.uniform(0.5, 1)), int(h * rng.uniform(0.5, 1))
            left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            image = base.crop((left, top, left + cw, top + ch)).resize(size[::-1], Image.BICUBIC)
        else:
            image = synthetic_photo(rng, size)
        image.save(folder / f"{i:06d}.jpg", quality=90)
    return root


class FeedOnly(Encoder):
    """The wrapped encoder's preprocessing, device and record, with no forward pass.

    ``embed`` still waits for the batch (a per-image mean copied to the host), so GPU decode
    and host-to-device copies are timed as in a real run."""

    def __init__(self, inner: Encoder) -> None:
        self.inner = inner
        self.name, self.dim, self.device = inner.name, inner.dim, inner.device
        self.weights_sha256, self.preprocessing = inner.weights_sha256, inner.preprocessing
        self.decode_size = inner.decode_size

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.inner.preprocess(image)

    def embed(self, batch: torch.Tensor) -> np.ndarray:
        means = batch.to(self.device, non_blocking=True).flatten(1).float().mean(1).cpu().numpy()
        return np.repeat(1.0 + means[:, None], self.dim, axis=1).astype(np.float32)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def floor_rate(encoder: Encoder, files: list[Path], batch_size: int, repeats: int) -> float:
    """Forward only: the batches are preprocessed and moved to the device before the clock."""
    n = min(len(files), batch_size * max(1, repeats))
    tensors = [encoder.preprocess(Image.open(p).convert("RGB")) for p in files[:batch_size]]
    batch = torch.stack(tensors).to(encoder.device)
    for _ in range(3):  # warm-up: cuDNN autotune, oneDNN primitives, TorchScript profiling runs
        encoder.embed(batch)
    sync(encoder.device)
    done = 0
    started = time.perf_counter()
    while done < n:
        encoder.embed(batch)
        done += batch.shape[0]
    sync(encoder.device)
    return done / (time.perf_counter() - started)


def end_to_end_rate(
    encoder: Encoder, root: Path, batch_size: int, workers: int | None, chunk_size: int
) -> tuple[float, int]:
    source = open_source(root)
    total = source.count()
    warm = list(source)[:batch_size]
    with tempfile.TemporaryDirectory() as tmp:
        embed_source(
            warm,
            encoder,
            EmbeddingStore(Path(tmp) / "warm"),
            batch_size=batch_size,
            num_workers=workers,
        )
    with tempfile.TemporaryDirectory() as tmp:
        store = EmbeddingStore(Path(tmp) / "store")
        started = time.perf_counter()
        report = embed_source(
            source,
            encoder,
            store,
            total=total,
            batch_size=batch_size,
            num_workers=workers,
            chunk_size=chunk_size,
        )
        sync(encoder.device)
        seconds = time.perf_counter() - started
    if report.failures:
        raise RuntimeError(f"benchmark images failed to embed: {report.failures[:3]}")
    return report.embedded / seconds, report.embedded


def stage_costs(encoder: Encoder, files: list[Path]) -> dict[str, float]:
    """Milliseconds per image of each host-side stage, on one thread."""
    data = [p.read_bytes() for p in files]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        started = time.perf_counter()
        images = [decode_image(b, draft_size=encoder.decode_size) for b in data]
        decode = time.perf_counter() - started
        started = time.perf_counter()
        for image in images:
            encoder.preprocess(image)
        preprocess = time.perf_counter() - started
        started = time.perf_counter()
        for b in data:
            open_image(b)
        header = time.perf_counter() - started
    finally:
        torch.set_num_threads(threads)
    n = len(data)
    return {"decode_ms": 1e3 * decode / n, "preprocess_ms": 1e3 * preprocess / n, "header_ms": 1e3 * header / n}


def naive_rate(encoder: Encoder, files: list[Path], batch_size: int) -> float:
    """What a user writes first: one thread, PIL open + preprocess, then the model, per batch."""
    started = time.perf_counter()
    for start in range(0, len(files), batch_size):
        batch = torch.stack(
            [
                encoder.preprocess(Image.open(p).convert("RGB"))
                for p in files[start : start + batch_size]
            ]
        )
        encoder.embed(batch)
    sync(encoder.device)
    return len(files) / (time.perf_counter() - started)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--encoders", default="open_clip:ViT-S-32:random,efficientnet-lite0")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--n", type=int, default=256, help="images (end-to-end and naive)")
    parser.add_argument(
        "--naive-n", type=int, default=None, help="images for the naive loop (default: --n)"
    )
    parser.add_argument("--image-size", type=int, default=256, help="side of the JPEGs written")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument(
        "--workers", type=int, default=None, help="decode threads (default: cores, max 16)"
    )
    parser.add_argument("--floor-repeats", type=int, default=4, help="batches timed for the floor")
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="floor and end-to-end alternate this many times; medians are reported "
        "(shared machines drift between measurements)",
    )
    parser.add_argument("--images-dir", default=None, help="reuse/keep the JPEGs here")
    parser.add_argument(
        "--out", default=None, help="folder for bench-embed.md and bench-embed.json"
    )
    args = parser.parse_args()

    tmp = tempfile.TemporaryDirectory()
    root = Path(args.images_dir or tmp.name) / f"jpegs-{args.n}-{args.image_size}"
    if not root.exists():
        t = time.perf_counter()
        write_images(root, args.n, (args.image_size, args.image_size))
        print(f"wrote {args.n} JPEGs in {time.perf_counter() - t:.1f}s to {root}", file=sys.stderr)
    files = sorted(root.rglob("*.jpg"))
    rows = []
    for name in [e for e in args.encoders.split(",") if e]:
        encoder = load_encoder(name, device=args.device, precision=args.precision)
        label = f"{encoder.name} ({encoder.preprocessing.get('precision')}, {encoder.device.type})"
        floors, e2es = [], []
        for round_ in range(1, max(1, args.rounds) + 1):
            print(f"{label}: round {round_}: floor, end-to-end ...", file=sys.stderr, flush=True)
            floors.append(floor_rate(encoder, files, args.batch_size, args.floor_repeats))
            e2e, n = end_to_end_rate(encoder, root, args.batch_size, args.workers, args.chunk_size)
            e2es.append(e2e)
        ratios = [e / f for e, f in zip(e2es, floors, strict=True)]
        floor, e2e = float(np.median(floors)), float(np.median(e2es))
        print(f"{label}: naive ...", file=sys.stderr, flush=True)
        naive = naive_rate(encoder, files[: args.naive_n or args.n], args.batch_size)
        print(f"{label}: feed (no forward) ...", file=sys.stderr, flush=True)
        feed, _ = end_to_end_rate(FeedOnly(encoder), root, args.batch_size, args.workers, args.chunk_size)
        stages = stage_costs(encoder, files[:200])
        rows.append(
            {
                "encoder": encoder.name,
                "precision": encoder.preprocessing.get("precision"),
                "device": str(encoder.device),
                "batch_size": args.batch_size,
                "images": n,
                "floor_per_s": floor,
                "end_to_end_per_s": e2e,
                "naive_per_s": naive,
                "feed_per_s": feed,
                **stages,
                "floor_per_s_rounds": floors,
                "end_to_end_per_s_rounds": e2es,
                "end_to_end_over_floor": float(np.median(ratios)),
                "end_to_end_over_floor_range": [min(ratios), max(ratios)],
                "end_to_end_over_naive": e2e / naive,
            }
        )
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
        del encoder
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "image_size": args.image_size,
        "command": " ".join(sys.argv),
    }
    table = [
        f"Embedding throughput, images/s ({args.image_size}px JPEGs; torch {env['torch']}, "
        f"{env['gpu'] or str(env['threads']) + ' CPU threads'})",
        "",
        "| encoder | precision | device | batch | floor (forward only) | end-to-end | naive loop | feed (no forward) | e2e / floor (range) | e2e / naive |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(
            f"| {r['encoder']} | {r['precision']} | {r['device']} | {r['batch_size']} | {r['floor_per_s']:.1f} | "
            f"{r['end_to_end_per_s']:.1f} | {r['naive_per_s']:.1f} | {r['feed_per_s']:.1f} | {r['end_to_end_over_floor']:.0%} "
            f"({r['end_to_end_over_floor_range'][0]:.0%}-{r['end_to_end_over_floor_range'][1]:.0%}) | "
            f"{r['end_to_end_over_naive']:.2f}x |"
        )
    table += ["", "Host stages per image, one thread (ms): decode / preprocess / header check only", ""]
    for r in rows:
        table.append(
            f"- {r['encoder']}: {r['decode_ms']:.2f} / {r['preprocess_ms']:.2f} / {r['header_ms']:.3f}"
        )
    text = "\n".join(table)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "bench-embed.md").write_text(text + "\n")
        (out / "bench-embed.json").write_text(json.dumps({"env": env, "rows": rows}, indent=2))
    print(text)
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
