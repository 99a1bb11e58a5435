"""GPU checks of the embedding engine, in one call (benchmarks/gpu_check.sh runs this).

1. GPU JPEG decode (nvJPEG) + GPU resize agree with the CPU PIL path (feature cosine).
2. Throughput per encoder: forward-only floor on preloaded GPU tensors, end-to-end with GPU
   decode, end-to-end with CPU decode workers, the naive one-thread loop, and the feed ceiling
   (end-to-end with the forward pass replaced by a no-op) for both decode routes.
Writes gpu-check.md and gpu-check.json into --out and prints the table last.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from bench_embed import (  # noqa: E402
    FeedOnly,
    end_to_end_rate,
    floor_rate,
    naive_rate,
    stage_costs,
    write_images,
)

from service.encoders import load_encoder  # noqa: E402
from service.pipeline.decode import decode_image  # noqa: E402
from service.pipeline.gpu_decode import decode_batch_on_gpu, gpu_decode_supported  # noqa: E402


def decode_agreement(encoder, files: list[Path]) -> dict:
    jpegs = [p.read_bytes() for p in files]
    cpu = torch.stack(
        [encoder.preprocess(decode_image(b, draft_size=encoder.decode_size)) for b in jpegs]
    )
    gpu = decode_batch_on_gpu(jpegs, encoder.preprocessing, encoder.device)
    a, b = encoder.embed(cpu), encoder.embed(gpu)
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    return {
        "images": len(files),
        "pixel_mean_abs_diff": float((gpu.float().cpu() - cpu).abs().mean()),
        "feature_cosine_min": float(cosine.min()),
        "feature_cosine_mean": float(cosine.mean()),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=os.environ.get("OUT", "./gpu-results"))
    parser.add_argument("--encoders", default="open_clip:ViT-B-16:random,efficientnet-lite0")
    parser.add_argument("--n", type=int, default=8192)
    parser.add_argument("--naive-n", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=None)
    parser.add_argument("--floor-repeats", type=int, default=8)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.backends.cudnn.benchmark = True
    cuda = torch.cuda.is_available()
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(0) if cuda else None,
        "cpu_cores": os.cpu_count(),
        "n": args.n,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
    }
    print(f"environment: {env}", flush=True)
    results: dict = {"env": env, "rows": [], "decode_agreement": None, "errors": []}
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        root = write_images(Path(tmp) / "jpegs", args.n, (args.image_size, args.image_size))
        files = sorted(root.rglob("*.jpg"))
        print(f"wrote {len(files)} JPEGs in {time.perf_counter() - t:.1f}s", flush=True)
        for name in [e for e in args.encoders.split(",") if e]:
            try:
                encoder = load_encoder(name, device="auto")
                label = f"{encoder.name} {encoder.preprocessing.get('precision')} {encoder.device}"
                if results["decode_agreement"] is None and gpu_decode_supported(
                    encoder.device, encoder.preprocessing
                ):
                    results["decode_agreement"] = {
                        "encoder": encoder.name,
                        **decode_agreement(encoder, files[:64]),
                    }
                    print(f"decode agreement: {results['decode_agreement']}", flush=True)
                floor = floor_rate(encoder, files, args.batch_size, args.floor_repeats)
                print(f"{label}: floor {floor:.0f}/s", flush=True)
                e2e_gpu, n = end_to_end_rate(encoder, root, args.batch_size, args.workers, 4096)
                print(f"{label}: end-to-end (GPU decode if CUDA) {e2e_gpu:.0f}/s", flush=True)
                feed_gpu, _ = end_to_end_rate(FeedOnly(encoder), root, args.batch_size, args.workers, 4096)
                print(f"{label}: feed, no forward (GPU decode if CUDA) {feed_gpu:.0f}/s", flush=True)
                os.environ["DIFFICULTY_GPU_JPEG"] = "0"
                try:
                    e2e_cpu, _ = end_to_end_rate(encoder, root, args.batch_size, args.workers, 4096)
                    feed_cpu, _ = end_to_end_rate(FeedOnly(encoder), root, args.batch_size, args.workers, 4096)
                finally:
                    os.environ.pop("DIFFICULTY_GPU_JPEG", None)
                print(f"{label}: end-to-end (CPU decode workers) {e2e_cpu:.0f}/s", flush=True)
                print(f"{label}: feed, no forward (CPU decode workers) {feed_cpu:.0f}/s", flush=True)
                naive = naive_rate(encoder, files[: args.naive_n], min(args.batch_size, 256))
                print(f"{label}: naive {naive:.0f}/s", flush=True)
                results["rows"].append(
                    {
                        "encoder": encoder.name,
                        "precision": encoder.preprocessing.get("precision"),
                        "device": str(encoder.device),
                        "images": n,
                        "floor_per_s": floor,
                        "end_to_end_gpu_decode_per_s": e2e_gpu,
                        "end_to_end_cpu_decode_per_s": e2e_cpu,
                        "naive_per_s": naive,
                        "feed_gpu_decode_per_s": feed_gpu,
                        "feed_cpu_decode_per_s": feed_cpu,
                        **stage_costs(encoder, files[:200]),
                    }
                )
                del encoder
                if cuda:
                    torch.cuda.empty_cache()
            except Exception as exc:  # report and go on: one run must bring back what it can
                results["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
                print(f"ERROR {name}: {type(exc).__name__}: {exc}", flush=True)
    lines = [
        f"Embedding throughput on {env['gpu'] or 'CPU'} (images/s; {args.image_size}px JPEGs, batch "
        f"{args.batch_size}, {args.n} images end-to-end, torch {env['torch']})",
        "",
        "| encoder | precision | floor (forward only) | end-to-end, GPU decode | end-to-end, CPU decode | naive loop | feed, GPU decode | feed, CPU decode | best e2e / floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results["rows"]:
        best = max(r["end_to_end_gpu_decode_per_s"], r["end_to_end_cpu_decode_per_s"])
        lines.append(
            f"| {r['encoder']} | {r['precision']} | {r['floor_per_s']:.0f} | {r['end_to_end_gpu_decode_per_s']:.0f} | "
            f"{r['end_to_end_cpu_decode_per_s']:.0f} | {r['naive_per_s']:.0f} | {r['feed_gpu_decode_per_s']:.0f} | "
            f"{r['feed_cpu_decode_per_s']:.0f} | {best / r['floor_per_s']:.0%} |"
        )
    lines += ["", "Host stages per image, one CPU thread (ms): decode / preprocess / header check only"]
    for r in results["rows"]:
        lines.append(f"- {r['encoder']}: {r['decode_ms']:.2f} / {r['preprocess_ms']:.2f} / {r['header_ms']:.3f}")
    if results["decode_agreement"]:
        d = results["decode_agreement"]
        lines.append("")
        lines.append(
            f"GPU vs CPU decode ({d['encoder']}, {d['images']} images): feature cosine min "
            f"{d['feature_cosine_min']:.4f}, mean {d['feature_cosine_mean']:.4f}; pixel mean |diff| {d['pixel_mean_abs_diff']:.4f}"
        )
    for error in results["errors"]:
        lines.append(f"ERROR {error}")
    table = "\n".join(lines)
    (out / "gpu-check.md").write_text(table + "\n")
    (out / "gpu-check.json").write_text(json.dumps(results, indent=2))
    print(table)
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
