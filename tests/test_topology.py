"""The docker-compose topology as native processes: PostgreSQL + one API + two workers.

What docker/compose.yaml runs (`api` with `serve --no-worker`, `worker` scaled to 2, `postgres`)
is started here as real subprocesses (cheap, and independent of the container test, which runs
the same topology in a real engine). Two datasets are fitted at once; the worker holding one of the jobs is killed
with SIGKILL in the middle of it. The other worker must take that job over once the lease
expires, resume it, and produce exactly the scores of an uninterrupted run of the same data.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pytest
import yaml
from apiserver import database_for, running_server, running_worker
from conftest import arrow_scores, assert_same_scores, job_state, npy
from sqlalchemy import Engine, create_engine, text

from service.storage import layout

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "topology-test-key"

# Small and slow on purpose: 15 chunks of 200 rows with a pause after each, so a job's embedding
# stage takes about 7 s and the kill lands between durable chunks (the resume points).
N_ROWS, DIM, N_CLASSES = 3000, 48, 6
CHUNK_ROWS = 200
SERVICE_ENV = {
    "DIFFICULTY_CHUNK_ROWS": str(CHUNK_ROWS),
    "DIFFICULTY_CHUNK_DELAY_SECONDS": "0.5",
    "DIFFICULTY_LEASE_SECONDS": "4",
    "DIFFICULTY_HEARTBEAT_SECONDS": "1",
    "DIFFICULTY_POLL_SECONDS": "0.2",
}


# --- the topology ----------------------------------------------------------------------------


@dataclass
class Topology:
    client: httpx.Client
    base_url: str
    workers: list[subprocess.Popen]
    engine: Engine  # the service's database, for the queue's lease columns
    database_url: str
    data_dir: Path

    def logs(self) -> str:
        """Tails of the API and worker logs (tests/apiserver.py writes them beside the data dir)."""
        paths = sorted(self.data_dir.parent.glob("server-*.log")) + [w.log_path for w in self.workers]
        return "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')[-3000:]}" for p in paths)


@pytest.fixture
def topology(tmp_path):
    """`difficulty serve --no-worker` + two `difficulty worker` on a fresh PostgreSQL database,
    sharing one data dir and one environment: the compose services without containers."""
    data_dir = tmp_path / "data"
    with contextlib.ExitStack() as stack:
        database_url = stack.enter_context(database_for("postgresql"))
        base_url = stack.enter_context(running_server(
            data_dir, database_url, api_keys={"topology": API_KEY}, with_worker=False, env=SERVICE_ENV
        ))
        workers = [stack.enter_context(running_worker(data_dir, database_url, SERVICE_ENV)) for _ in range(2)]
        client = stack.enter_context(httpx.Client(
            base_url=base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30
        ))
        engine = create_engine(database_url)
        stack.callback(engine.dispose)
        yield Topology(client, base_url, workers, engine, database_url, data_dir)


# --- helpers ---------------------------------------------------------------------------------


def make_data(seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Class-structured features: separated class means plus noise, some labels flipped."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, N_CLASSES, N_ROWS)
    means = rng.normal(0.0, 2.0, (N_CLASSES, DIM))
    features = means[labels] + rng.normal(0.0, 1.0, (N_ROWS, DIM))
    flipped = rng.random(N_ROWS) < 0.05
    labels[flipped] = rng.integers(0, N_CLASSES, flipped.sum())
    ids = [f"s{seed}-{i:05d}" for i in range(N_ROWS)]
    return features.astype(np.float32), labels.astype(np.int64), ids


def create_dataset(client: httpx.Client, name: str, data) -> str:
    features, labels, ids = data
    response = client.post("/v1/datasets", json={"name": name})
    assert response.status_code == 201, response.text
    dataset_id = response.json()["id"]
    response = client.post(
        f"/v1/datasets/{dataset_id}/embeddings",
        files={
            "embeddings": ("embeddings.npy", npy(features), "application/octet-stream"),
            "labels": ("labels.npy", npy(labels), "application/octet-stream"),
            "ids": ("ids.txt", ("\n".join(ids) + "\n").encode(), "text/plain"),
        },
    )
    assert response.status_code < 300, response.text
    return dataset_id


def start_fit(client: httpx.Client, dataset_id: str) -> str:
    response = client.post(f"/v1/datasets/{dataset_id}/fit", json={})
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def lease_owner(engine: Engine, job_id: str) -> str | None:
    """The worker holding (or last holding) a job, from the queue table the workers share."""
    with engine.connect() as connection:
        return connection.execute(
            text("SELECT lease_owner FROM jobs WHERE id = :id"), {"id": job_id}
        ).scalar_one()


def owner_pid(owner: str) -> int:
    """Worker owners are 'host:pid:suffix' (service.jobs.worker.Worker)."""
    return int(owner.split(":")[1])


def chunk_files(store_dir: Path) -> dict[str, int]:
    """Durable chunks of an embedding store -> modification time (ns)."""
    return {p.name: p.stat().st_mtime_ns for p in store_dir.glob("chunk-*.npz")}


def wait_succeeded(top: Topology, job_ids: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = set(job_ids)
    while pending:
        for job_id in list(pending):
            state = job_state(top.client, job_id)
            assert state["state"] not in ("failed", "cancelled"), f"{state}\n{top.logs()}"
            if state["state"] == "succeeded":
                pending.discard(job_id)
        assert time.monotonic() < deadline, f"jobs {pending} did not finish:\n{top.logs()}"
        time.sleep(0.3)


def scores(client: httpx.Client, dataset_id: str) -> pa.Table:
    return arrow_scores(client, dataset_id, N_ROWS)


def same_scores(got: pa.Table, expected: pa.Table) -> None:
    assert_same_scores(got, expected, tolerance=1e-9)


def container_healthchecks() -> dict[str, list[str]]:
    """The health-check commands of docker/compose.yaml and docker/Dockerfile (exec form)."""
    compose = yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())
    checks = {f"compose {name}": service["healthcheck"]["test"]
              for name, service in compose["services"].items()
              # postgres is the official image's check; the Ray profile's checks are `ray` CLI
              # calls against a Ray head, not this topology.
              if name != "postgres" and "profiles" not in service}
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text().replace("\\\n", " ")
    line = next(line for line in dockerfile.splitlines() if line.startswith("HEALTHCHECK"))
    checks["Dockerfile"] = ["CMD", *json.loads(line.split(" CMD ", 1)[1])]
    return checks


# --- the test --------------------------------------------------------------------------------


def check_container_healthchecks(top: Topology) -> None:
    """The health checks that compose and the image run pass against these processes."""
    port = top.base_url.rsplit(":", 1)[1]
    env = {**os.environ, "DIFFICULTY_DATABASE_URL": top.database_url, "DIFFICULTY_DATA_DIR": str(top.data_dir)}
    for name, test in container_healthchecks().items():
        # In the container the API listens on 8000 and `python` is the image's virtualenv.
        assert test[:2] == ["CMD", "python"], name
        command = [sys.executable, *(a.replace(":8000/", f":{port}/") for a in test[2:])]
        assert ("urllib" in command[-1]) == (f":{port}/" in command[-1]), name
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, f"{name} health check failed: {result.stderr}"


# --- the test ---------------------------------------------------------------------------------


def test_worker_killed_mid_job_is_taken_over_with_identical_scores(topology):
    top = topology
    client = top.client
    check_container_healthchecks(top)

    data_a, data_b = make_data(1), make_data(2)
    dataset_a = create_dataset(client, "topology-a", data_a)
    dataset_b = create_dataset(client, "topology-b", data_b)
    job_a, job_b = start_fit(client, dataset_a), start_fit(client, dataset_b)

    # Both jobs run at once, one per worker; wait until job A has written a few chunks.
    deadline = time.monotonic() + 120
    while True:
        state_a, state_b = job_state(client, job_a), job_state(client, job_b)
        owner_a, owner_b = lease_owner(top.engine, job_a), lease_owner(top.engine, job_b)
        both_running = state_a["state"] == state_b["state"] == "running" and owner_a != owner_b
        if both_running and state_a["stage"] == "embedding" and state_a["progress"]["done"] >= 2 * CHUNK_ROWS:
            break
        assert state_a["stage"] in (None, "embedding"), f"missed job A's embedding stage: {state_a}"
        assert time.monotonic() < deadline, f"two jobs never ran at once:\n{top.logs()}"
        time.sleep(0.2)

    # SIGKILL the worker that holds job A: no clean-up, no lease release.
    store_a = layout.store_dir(top.data_dir, dataset_a)
    chunks_before_kill = chunk_files(store_a)
    victim = next(w for w in top.workers if w.pid == owner_pid(owner_a))
    survivor = next(w for w in top.workers if w is not victim)
    os.kill(victim.pid, signal.SIGKILL)
    assert victim.wait(timeout=10) == -signal.SIGKILL

    # The survivor finishes its own job B, then takes A over once A's lease has expired.
    wait_succeeded(top, [job_a, job_b], timeout=240)
    assert job_state(client, job_a)["attempts"] == 2 and job_state(client, job_b)["attempts"] == 1
    assert owner_pid(lease_owner(top.engine, job_a)) == survivor.pid
    assert owner_pid(lease_owner(top.engine, job_b)) == survivor.pid
    assert survivor.poll() is None, "the surviving worker died:\n" + top.logs()
    # Resumed, not restarted: the chunks finished before the kill were not written again.
    chunks_after = chunk_files(store_a)
    assert len(chunks_after) == N_ROWS // CHUNK_ROWS
    assert chunks_before_kill and all(chunks_after[n] == t for n, t in chunks_before_kill.items())

    # Uninterrupted reference: the same data in fresh datasets, fitted by the survivor alone.
    reference_a = create_dataset(client, "reference-a", data_a)
    reference_b = create_dataset(client, "reference-b", data_b)
    reference_jobs = [start_fit(client, reference_a), start_fit(client, reference_b)]
    wait_succeeded(top, reference_jobs, timeout=240)
    assert all(job_state(client, j)["attempts"] == 1 for j in reference_jobs)

    same_scores(scores(client, dataset_a), scores(client, reference_a))
    same_scores(scores(client, dataset_b), scores(client, reference_b))
