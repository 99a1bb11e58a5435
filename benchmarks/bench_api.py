"""Serving benchmark: upload, fit and serve scores of a large precomputed-embeddings dataset.

    .venv/bin/python benchmarks/bench_api.py                      # 1,000,000 x 512 (about 10 min, 8 GB disk)
    .venv/bin/python benchmarks/bench_api.py --n 100000 --seconds 10   # quick

Starts the real server (uvicorn, SQLite, in-process worker) on loopback, uploads an N x D float32
.npy through the multipart endpoint, fits, then measures with 32 concurrent clients:
- score pages (limit=100) at random cursor positions: requests/s, p50/p99 latency;
- the full Arrow export (format=arrow), and Parquet/CSV;
and, side by side, what a page costs in-process for the layout the service uses (binary search
over a memory-mapped Arrow file) against the database alternatives (SQLite keyset over an index,
and OFFSET). Peak resident memory of the server process is reported against the matrix size.
The load generator runs on the same machine and competes for its CPUs (numbers are lower bounds).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.pipeline.fitting import SCORE_COLUMNS  # noqa: E402
from service.storage.scores import Cursor, page  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def peak_rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def make_data(directory: Path, n: int, dim: int, classes: int, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (classes, dim)).astype(np.float32)
    labels = rng.integers(0, classes, n)
    features = np.lib.format.open_memmap(
        directory / "embeddings.npy", mode="w+", dtype=np.float32, shape=(n, dim)
    )
    for start in range(0, n, 65536):
        stop = min(start + 65536, n)
        block = rng.standard_normal((stop - start, dim), dtype=np.float32) * 2.0
        block += centres[labels[start:stop]]
        features[start:stop] = block
    features.flush()
    del features
    (directory / "labels.txt").write_text("\n".join(f"c{x:03d}" for x in labels) + "\n")
    return directory / "embeddings.npy", directory / "labels.txt"


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


async def page_load(
    base: str, dataset_id: str | None, cursors: list[str], clients: int, seconds: float
) -> dict:
    """Closed-loop load: ``clients`` concurrent clients for ``seconds``; dataset None = /healthz
    (the framework's floor on this machine, for the ratio)."""
    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=60) as client:

        async def one_client(seed: int) -> None:
            nonlocal errors
            rnd = random.Random(seed)
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                if dataset_id is None:
                    response = await client.get("/healthz")
                    ok = response.status_code == 200
                else:
                    params = {
                        "limit": 100,
                        "order": rnd.choice(["asc", "desc"]),
                        "cursor": rnd.choice(cursors),
                    }
                    response = await client.get(f"/v1/datasets/{dataset_id}/scores", params=params)
                    ok = response.status_code == 200 and len(response.json()["items"]) > 0
                latencies.append(time.perf_counter() - started)
                errors += not ok

        started = time.perf_counter()
        await asyncio.gather(*(one_client(i) for i in range(clients)))
        elapsed = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "errors": errors,
        "requests_per_second": len(latencies) / elapsed,
        "p50_ms": 1000 * percentile(latencies, 50),
        "p99_ms": 1000 * percentile(latencies, 99),
    }


def layout_comparison(
    table: pa.Table, fit_dir: Path, work: Path, samples: int = 200
) -> dict[str, dict[str, float]]:
    """Per-page cost in-process: the Arrow-file layout against SQLite keyset and OFFSET."""
    rng = np.random.default_rng(1)
    n = table.num_rows
    rows = rng.integers(0, n - 101, samples)
    ids = table.column("sample_id").to_pylist()
    rmd = table.column("rmd").to_numpy()
    out: dict[str, dict[str, float]] = {}

    def timed(fn) -> dict[str, float]:  # type: ignore[no-untyped-def]
        times = []
        for r in rows:
            started = time.perf_counter()
            fn(int(r))
            times.append(time.perf_counter() - started)
        return {"p50_ms": 1000 * percentile(times, 50), "p99_ms": 1000 * percentile(times, 99)}

    out["arrow file, binary search (service)"] = timed(
        lambda r: page(
            fit_dir, limit=100, cursor=Cursor(float(rmd[r]), ids[r]), descending=False, label=None
        )
    )
    db_path = work / "compare.sqlite"
    connection = sqlite3.connect(db_path)
    connection.execute(
        "CREATE TABLE scores (sample_id TEXT, label TEXT, rmd REAL, md_class REAL, md_agnostic REAL,"
        " rmd_min REAL, predicted_label TEXT)"
    )
    started = time.perf_counter()
    columns = [table.column(c).to_pylist() for c in SCORE_COLUMNS]
    connection.executemany("INSERT INTO scores VALUES (?,?,?,?,?,?,?)", zip(*columns, strict=True))
    connection.execute("CREATE INDEX ix ON scores (rmd, sample_id)")
    connection.commit()
    load_seconds = time.perf_counter() - started
    out["sqlite keyset (index on rmd, sample_id)"] = timed(
        lambda r: connection.execute(
            "SELECT * FROM scores WHERE (rmd, sample_id) > (?, ?) ORDER BY rmd, sample_id LIMIT 100",
            (float(rmd[r]), ids[r]),
        ).fetchall()
    )
    out["sqlite OFFSET"] = timed(
        lambda r: connection.execute(
            "SELECT * FROM scores ORDER BY rmd, sample_id LIMIT 100 OFFSET ?", (r,)
        ).fetchall()
    )
    out["sqlite OFFSET"]["load_seconds"] = load_seconds
    connection.close()
    db_path.unlink()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--work-dir", default=None, help="default: a temporary directory (removed)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="bench-api-"))
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {
        "n": args.n,
        "dim": args.dim,
        "classes": args.classes,
        "clients": args.clients,
    }
    matrix_bytes = args.n * args.dim * 4
    server = None
    try:
        started = time.perf_counter()
        emb_path, labels_path = make_data(work, args.n, args.dim, args.classes)
        print(
            f"generated {args.n} x {args.dim} float32 ({matrix_bytes / 1e9:.2f} GB) in {time.perf_counter() - started:.1f}s",
            flush=True,
        )

        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFICULTY_")}
        env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
        data_dir = work / "data"
        log = open(work / "server.log", "wb")  # noqa: SIM115
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service.cli",
                "serve",
                "--port",
                str(port),
                "--data-dir",
                str(data_dir),
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        client = httpx.Client(base_url=base, timeout=3600)
        dataset_id = client.post(
            "/v1/datasets", json={"name": "bench", "encoder": "bench-features"}
        ).json()["id"]

        started = time.perf_counter()
        with open(emb_path, "rb") as emb, open(labels_path, "rb") as lab:
            response = client.post(
                f"/v1/datasets/{dataset_id}/embeddings",
                files={"embeddings": ("embeddings.npy", emb), "labels": ("labels.txt", lab)},
            )
        response.raise_for_status()
        results["upload_seconds"] = time.perf_counter() - started
        print(f"upload: {results['upload_seconds']:.1f}s", flush=True)

        started = time.perf_counter()
        job_id = client.post(f"/v1/datasets/{dataset_id}/fit", json={"shrinkage": "auto"}).json()[
            "job_id"
        ]
        stages: dict[str, float] = {}
        while True:
            job = client.get(f"/v1/jobs/{job_id}").json()
            stages.setdefault(job["stage"] or "queued", time.perf_counter() - started)
            if job["state"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.5)
        if job["state"] != "succeeded":
            raise SystemExit(f"fit {job['state']}: {job['error']}")
        results["fit_seconds"] = time.perf_counter() - started
        results["fit_stage_started_at"] = stages
        results["server_peak_rss_gb"] = peak_rss_bytes(server.pid) / 1e9
        results["matrix_gb"] = matrix_bytes / 1e9
        print(
            f"fit: {results['fit_seconds']:.1f}s (stages started at {stages}); server peak RSS "
            f"{results['server_peak_rss_gb']:.2f} GB = {results['server_peak_rss_gb'] / results['matrix_gb']:.2f}x the matrix",
            flush=True,
        )

        started = time.perf_counter()
        exported = client.get(f"/v1/datasets/{dataset_id}/scores", params={"format": "arrow"})
        table = pa.ipc.open_stream(exported.content).read_all()
        results["arrow_export_seconds"] = time.perf_counter() - started
        results["arrow_export_mb"] = len(exported.content) / 1e6
        assert table.num_rows == args.n
        for fmt in ("parquet", "csv"):
            started = time.perf_counter()
            body = client.get(f"/v1/datasets/{dataset_id}/scores", params={"format": fmt}).content
            results[f"{fmt}_export_seconds"] = time.perf_counter() - started
            results[f"{fmt}_export_mb"] = len(body) / 1e6
        print(
            f"arrow export: {results['arrow_export_seconds']:.2f}s ({results['arrow_export_mb']:.0f} MB)",
            flush=True,
        )

        rng = np.random.default_rng(0)
        picks = rng.integers(0, table.num_rows, 5000)
        ids = table.column("sample_id").to_pylist()
        rmd = table.column("rmd").to_numpy()
        cursors = [Cursor(float(rmd[i]), ids[i]).encode() for i in picks]
        cpu_before = cpu_seconds(server.pid)
        results["pages"] = asyncio.run(
            page_load(base, dataset_id, cursors, args.clients, args.seconds)
        )
        pages = results["pages"]
        pages["server_cpu_ms_per_request"] = (
            1000 * (cpu_seconds(server.pid) - cpu_before) / max(pages["requests"], 1)
        )
        cpu_before = cpu_seconds(server.pid)
        results["healthz"] = floor = asyncio.run(
            page_load(base, None, [], args.clients, min(args.seconds, 10))
        )
        floor["server_cpu_ms_per_request"] = (
            1000 * (cpu_seconds(server.pid) - cpu_before) / max(floor["requests"], 1)
        )
        print(f"score pages: {results['pages']}", flush=True)
        results["server_peak_rss_gb"] = max(
            results["server_peak_rss_gb"], peak_rss_bytes(server.pid) / 1e9
        )  # type: ignore[call-overload]

        fit_id = client.get(f"/v1/datasets/{dataset_id}").json()["fit"]["id"]
        fit_dir = data_dir / "datasets" / dataset_id / "fits" / fit_id
        results["page_layouts"] = layout_comparison(
            table.sort_by([("rmd", "ascending"), ("sample_id", "ascending")]), fit_dir, work
        )
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print(
        "| N x D | upload | fit (embed copy + fit + score + publish) | server peak RSS | Arrow export | Parquet | CSV |"
    )
    print("|---|---|---|---|---|---|---|")
    print(
        f"| {args.n:,} x {args.dim} | {results['upload_seconds']:.1f} s | {results['fit_seconds']:.1f} s | "
        f"{results['server_peak_rss_gb']:.2f} GB ({results['server_peak_rss_gb'] / results['matrix_gb']:.2f}x matrix) | "
        f"{results['arrow_export_seconds']:.2f} s ({results['arrow_export_mb']:.0f} MB) | "
        f"{results['parquet_export_seconds']:.2f} s | {results['csv_export_seconds']:.2f} s |"
    )
    p = results["pages"]
    print()
    print(
        f"| score pages (limit=100, random cursors, {args.clients} clients, {args.seconds:.0f} s) | requests/s | p50 | p99 | server CPU per request | errors |"
    )
    print("|---|---|---|---|---|---|")
    print(
        f"| HTTP, JSON | {p['requests_per_second']:.0f} | {p['p50_ms']:.1f} ms | {p['p99_ms']:.1f} ms | "  # type: ignore[index]
        f"{p['server_cpu_ms_per_request']:.2f} ms | {p['errors']} |"
    )  # type: ignore[index]
    h = results["healthz"]
    print(
        f"| HTTP, GET /healthz (framework floor) | {h['requests_per_second']:.0f} | {h['p50_ms']:.1f} ms | "  # type: ignore[index]
        f"{h['p99_ms']:.1f} ms | {h['server_cpu_ms_per_request']:.2f} ms | {h['errors']} |"
    )  # type: ignore[index]
    print()
    print("| page layout (in-process, one page, random position) | p50 | p99 |")
    print("|---|---|---|")
    for name, row in results["page_layouts"].items():  # type: ignore[union-attr]
        print(f"| {name} | {row['p50_ms']:.3f} ms | {row['p99_ms']:.3f} ms |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
