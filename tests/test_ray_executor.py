"""The Ray executor on a local Ray cluster: same store and scores as the local executor, and
a SIGKILLed actor loses no sample and stores none twice."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from ci import skip_unless_ci

try:
    import ray
except ImportError:  # the optional extra '.[ray]'; the dev extra (and so CI) installs it
    skip_unless_ci("Ray is the optional extra '.[ray]'")

from fmnist_images import write_fmnist_folder  # noqa: E402

from service.encoders import load_encoder  # noqa: E402
from service.ingest import open_source  # noqa: E402
from service.pipeline.embedding import embed_source  # noqa: E402
from service.pipeline.fitting import fit_store  # noqa: E402
from service.pipeline.ray_executor import RayExecutor, RaySettings  # noqa: E402
from service.storage.embeddings import EmbeddingStore  # noqa: E402

pytestmark = pytest.mark.slow
ENCODER = "efficientnet-lite0"


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             _node_ip_address="127.0.0.1", ignore_reinit_error=True)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("fmnist")
    try:
        ids = write_fmnist_folder(root, n=48)
    except FileNotFoundError as exc:
        skip_unless_ci(str(exc))
    (root / "shirt_bad").mkdir()
    (root / "shirt_bad" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    return root, ids


def ray_executor(batch_size: int = 64) -> RayExecutor:
    return RayExecutor(ENCODER, batch_size=batch_size, device="cpu", settings=RaySettings(num_actors=1))


@pytest.fixture(scope="module")
def local_store(tmp_path_factory, images) -> EmbeddingStore:
    store = EmbeddingStore(tmp_path_factory.mktemp("local"))
    embed_source(open_source(images[0]), load_encoder(ENCODER, device="cpu"), store, chunk_size=8, batch_size=8)
    return store


def test_ray_equals_local(cluster, images, local_store, tmp_path):
    store = EmbeddingStore(tmp_path / "ray")
    seen = []
    report = embed_source(
        open_source(images[0]), ray_executor(batch_size=8), store, chunk_size=8,
        progress=lambda done, total: seen.append(done),
    )
    assert report.embedded == len(images[1]) == 48
    assert [f[0] for f in report.failures] == ["shirt_bad/broken.png"]
    assert store.failures() == local_store.failures()
    assert store.chunk_indices() == local_store.chunk_indices()
    for a, b in zip(store.iter_chunks(), local_store.iter_chunks(), strict=True):
        np.testing.assert_array_equal(a.sample_ids, b.sample_ids)
        np.testing.assert_array_equal(a.labels, b.labels)
        np.testing.assert_allclose(a.features, b.features, rtol=1e-4, atol=1e-5)
    assert seen[-1] == 49 and seen == sorted(seen)  # progress reached the driver, monotonic

    ours, theirs = fit_store(store, shrinkage=0.1).scores, fit_store(local_store, shrinkage=0.1).scores
    assert ours.column("sample_id").to_pylist() == theirs.column("sample_id").to_pylist()
    np.testing.assert_allclose(ours.column("rmd").to_numpy(), theirs.column("rmd").to_numpy(), rtol=1e-3, atol=1e-3)
    assert ours.column("predicted_label").to_pylist() == theirs.column("predicted_label").to_pylist()

    # Resume: nothing left to do, nothing written twice.
    again = embed_source(open_source(images[0]), ray_executor(), store, chunk_size=8)
    assert again.embedded == 0 and again.skipped_existing == 49


def _actor_pids() -> list[int]:
    """PIDs of Ray Data's map actors (their process title names MapWorker), read from /proc."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"MapWorker" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:  # the process ended while we looked
            continue
    return pids


def test_killed_actor_is_retried_without_loss_or_duplicates(cluster, images, local_store, tmp_path):
    store = EmbeddingStore(tmp_path / "ray-fault")
    result: dict[str, object] = {}

    def run() -> None:
        result["report"] = embed_source(open_source(images[0]), ray_executor(batch_size=4), store, chunk_size=4)

    thread = threading.Thread(target=run)
    thread.start()
    killed = None
    deadline = time.monotonic() + 120
    while killed is None and time.monotonic() < deadline and thread.is_alive():
        pids = _actor_pids()
        if store.chunk_indices() and pids:  # mid-run: some chunks stored, an actor working
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.05)
    thread.join(timeout=300)
    assert killed is not None, "the run finished before an actor could be killed"
    assert not thread.is_alive()
    ids = store.sample_ids().tolist()
    assert len(ids) == len(set(ids)) == 48  # none lost, none twice
    assert sorted(ids) == sorted(local_store.sample_ids().tolist())
    assert [f[0] for f in store.failures()] == ["shirt_bad/broken.png"]


def test_fit_job_with_ray_executor_equals_local(cluster, images, tmp_path):
    """The service itself, pointed at an existing Ray cluster (RAY_ADDRESS), fits an uploaded
    archive of real images; its scores equal those of the embedded default."""
    import io
    import zipfile

    import httpx
    import pyarrow as pa
    from apiserver import running_server, wait_for_job

    root = images[0]
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(root.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(root).as_posix())
    address = ray.get_runtime_context().gcs_address
    tables = {}
    for executor in ("local", "ray"):
        env = {"DIFFICULTY_EXECUTOR": executor, "RAY_ADDRESS": address, "DIFFICULTY_IMAGE_CHUNK_ROWS": "16"}
        with running_server(tmp_path / executor, env=env) as base, httpx.Client(base_url=base, timeout=60) as client:
            ds = client.post("/v1/datasets", json={"name": executor, "encoder": ENCODER}).json()["id"]
            up = client.post(f"/v1/datasets/{ds}/items", files={"file": ("images.zip", buffer.getvalue())})
            assert up.status_code in (200, 201, 202), up.text
            job = client.post(f"/v1/datasets/{ds}/fit", json={"shrinkage": 0.1}).json()["job_id"]
            state = wait_for_job(client, job, timeout=300)
            assert state["state"] == "succeeded", state
            assert state["progress"]["done"] >= 48
            assert state["result"]["executor"] == executor
            export = client.get(f"/v1/datasets/{ds}/scores", params={"format": "arrow"})
            tables[executor] = pa.ipc.open_stream(export.content).read_all().sort_by("sample_id")
            failures = client.get(f"/v1/datasets/{ds}/failures").json()
            assert "shirt_bad/broken.png" in str(failures)
    local, remote = tables["local"], tables["ray"]
    assert local.column("sample_id").to_pylist() == remote.column("sample_id").to_pylist()
    np.testing.assert_allclose(remote.column("rmd").to_numpy(), local.column("rmd").to_numpy(), rtol=1e-3, atol=1e-3)
