"""Jobs across processes: a worker killed mid-job is taken over after its lease expires and the
job resumes from the last finished chunk; cancel works for queued and running jobs."""

from __future__ import annotations

import io
import time

import httpx
import numpy as np
import pyarrow as pa
import pytest
from apiserver import (
    database_for,
    running_server,
    running_worker,
    wait_for_job,
)

# Slow, deterministic jobs: 15 chunks of 100 rows, a (test-only) pause after each chunk.
ENV = {
    "DIFFICULTY_LEASE_SECONDS": "2",
    "DIFFICULTY_HEARTBEAT_SECONDS": "0.5",
    "DIFFICULTY_POLL_SECONDS": "0.2",
    "DIFFICULTY_CHUNK_ROWS": "100",
    "DIFFICULTY_CHUNK_DELAY_SECONDS": "0.3",
}
N = 1500


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def deployment(request, tmp_path_factory):
    """API without an in-process worker; tests start `difficulty worker` processes."""
    data_dir = tmp_path_factory.mktemp(f"jobs-{request.param}") / "data"
    with (
        database_for(request.param) as db_url,
        running_server(data_dir, database_url=db_url, with_worker=False, env=ENV) as url,
    ):
        yield url, data_dir, db_url


def new_dataset(c: httpx.Client) -> str:
    rng = np.random.default_rng(42)
    labels = rng.integers(0, 4, N)
    features = rng.normal(size=(N, 12)).astype(np.float32)
    features[:, 0] += 2 * labels
    buffer = io.BytesIO()
    np.save(buffer, features)
    dataset_id = c.post("/v1/datasets", json={"name": "slow", "encoder": "feats"}).json()["id"]
    response = c.post(
        f"/v1/datasets/{dataset_id}/embeddings",
        files={
            "embeddings": ("e.npy", buffer.getvalue()),
            "labels": ("l.txt", "\n".join(map(str, labels))),
            "ids": ("i.txt", "\n".join(f"s{i:05d}" for i in range(N))),
        },
    )
    assert response.status_code == 201, response.text
    return dataset_id


def wait_until(predicate, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise TimeoutError("condition not reached")


def scores(c: httpx.Client, dataset_id: str) -> pa.Table:
    response = c.get(f"/v1/datasets/{dataset_id}/scores", params={"format": "arrow"})
    table = pa.ipc.open_stream(response.content).read_all()
    return table.sort_by("sample_id")


def test_killed_worker_is_taken_over_and_resumes(deployment):
    url, data_dir, db_url = deployment
    with httpx.Client(base_url=url, timeout=60) as c:
        interrupted, reference = new_dataset(c), new_dataset(c)
        job_id = c.post(f"/v1/datasets/{interrupted}/fit").json()["job_id"]
        store = data_dir / "datasets" / interrupted / "embeddings"
        with running_worker(data_dir, db_url, env=ENV) as first:
            wait_until(lambda: len(list(store.glob("chunk-*.npz"))) >= 3)
            first.kill()  # SIGKILL: no clean-up, the lease is left to expire
            first.wait()
        written = {p.name: p.stat().st_mtime_ns for p in store.glob("chunk-*.npz")}
        assert 3 <= len(written) < 15
        job = c.get(f"/v1/jobs/{job_id}").json()
        assert job["state"] == "running" and job["progress"]["done"] >= 100

        with running_worker(data_dir, db_url, env=ENV):
            job = wait_for_job(c, job_id, timeout=120)
            assert job["state"] == "succeeded", job
            assert job["attempts"] == 2
            # Resumed: the chunks finished before the kill were not written again.
            after = {p.name: p.stat().st_mtime_ns for p in store.glob("chunk-*.npz")}
            assert len(after) == 15 and all(after[name] == stamp for name, stamp in written.items())

            other = wait_for_job(c, c.post(f"/v1/datasets/{reference}/fit").json()["job_id"], timeout=120)
            assert other["state"] == "succeeded" and other["attempts"] == 1
        a, b = scores(c, interrupted), scores(c, reference)
        assert a.num_rows == b.num_rows == N
        for column in ("sample_id", "label", "predicted_label"):
            assert a.column(column).to_pylist() == b.column(column).to_pylist()
        for column in ("rmd", "md_class", "md_agnostic", "rmd_min", "knn_agreement"):
            np.testing.assert_array_equal(a.column(column).to_numpy(), b.column(column).to_numpy())


def test_cancel_queued_and_running_jobs(deployment):
    url, data_dir, db_url = deployment
    with httpx.Client(base_url=url, timeout=60) as c:
        dataset_id = new_dataset(c)
        # No worker yet: the job stays queued and is cancelled at once.
        queued = c.post(f"/v1/datasets/{dataset_id}/fit").json()["job_id"]
        assert c.post(f"/v1/datasets/{dataset_id}/fit").status_code == 409  # one active job per dataset
        cancelled = c.post(f"/v1/jobs/{queued}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
        assert c.post(f"/v1/jobs/{queued}/cancel").status_code == 409

        running = c.post(f"/v1/datasets/{dataset_id}/fit").json()["job_id"]
        with running_worker(data_dir, db_url, env=ENV):
            wait_until(lambda: c.get(f"/v1/jobs/{running}").json()["progress"]["done"] >= 200)
            response = c.post(f"/v1/jobs/{running}/cancel")
            assert response.status_code == 200 and response.json()["cancel_requested"] is True
            job = wait_for_job(c, running, timeout=60)
        assert job["state"] == "cancelled" and job["error"]
        assert c.get(f"/v1/datasets/{dataset_id}").json()["fit"] is None
        assert c.get(f"/v1/datasets/{dataset_id}/scores").status_code == 409
