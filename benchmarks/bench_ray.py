"""Ray executor overhead against the local executor, on the same real images, in one run.

    python benchmarks/bench_ray.py --images 512 --encoder efficientnet-lite0

Both embed the same Fashion-MNIST images (PNG files in a temporary ImageFolder) into fresh
stores with the same chunk and batch sizes on this machine's CPU. The Ray run uses a local
cluster (``ray.init(num_cpus=N + 1)``) with one CPU actor of N CPUs, so the difference is the executor's
overhead: cluster start, actor start (one model load), serialisation and scheduling.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import ray

from service.encoders import load_encoder
from service.ingest import open_source
from service.pipeline.embedding import embed_source
from service.pipeline.ray_executor import RayExecutor, RaySettings
from service.storage.embeddings import EmbeddingStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fmnist_images import write_fmnist_folder  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--encoder", default="efficientnet-lite0")
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--cpus", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "images"
        write_fmnist_folder(root, n=args.images, classes=10)

        t0 = time.perf_counter()
        encoder = load_encoder(args.encoder, device="cpu")
        t_load = time.perf_counter() - t0
        t0 = time.perf_counter()
        local = embed_source(open_source(root), encoder, EmbeddingStore(Path(tmp) / "local"),
                             chunk_size=args.chunk_size, batch_size=args.batch_size)
        t_local = time.perf_counter() - t0 + t_load

        t0 = time.perf_counter()
        # One logical CPU more than the actor takes, or Ray Data's read tasks starve and it hangs.
        ray.init(num_cpus=args.cpus + 1, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1")
        t_init = time.perf_counter() - t0
        t0 = time.perf_counter()
        executor = RayExecutor(args.encoder, batch_size=args.batch_size, device="cpu",
                               settings=RaySettings(num_actors=1, cpus_per_actor=args.cpus))
        remote = embed_source(open_source(root), executor, EmbeddingStore(Path(tmp) / "ray"),
                              chunk_size=args.chunk_size)
        t_ray = time.perf_counter() - t0
        ray.shutdown()
    assert local.embedded == remote.embedded == args.images
    n = args.images
    print(f"{n} Fashion-MNIST images, {args.encoder}, chunk {args.chunk_size}, batch {args.batch_size}, CPU")
    print(f"{'executor':<44} {'seconds':>8} {'img/s':>8} {'x local':>8}")
    print(f"{'local (model load + embed)':<44} {t_local:8.2f} {n / t_local:8.1f} {1.0:8.2f}")
    print(f"{'ray, excluding ray.init':<44} {t_ray:8.2f} {n / t_ray:8.1f} {t_ray / t_local:8.2f}")
    print(f"{'ray, including ray.init':<44} {t_ray + t_init:8.2f} {n / (t_ray + t_init):8.1f} {(t_ray + t_init) / t_local:8.2f}")


if __name__ == "__main__":
    main()
