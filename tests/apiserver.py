"""Start the real service on loopback for tests (uvicorn in a subprocess), on SQLite or PostgreSQL.

Public API (other test modules import these):

    running_server(data_dir, database_url=None, api_keys=None, with_worker=True, env=None)
        context manager -> base_url ("http://127.0.0.1:<port>"); the server runs
        `python -m service.cli serve` on a free port against ``data_dir``; stopped on exit.
        ``api_keys``: {tenant: key} (becomes DIFFICULTY_API_KEYS="tenant:key,...") or None.
        ``env``: extra environment, e.g. {"DIFFICULTY_LEASE_SECONDS": "2"}.
    running_worker(data_dir, database_url=None, env=None)
        context manager -> subprocess.Popen of `python -m service.cli worker` (kill it to test
        take-over; it is terminated on exit if still running).
    postgres_database()
        context manager -> SQLAlchemy URL of a fresh database `difficulty_test_<hex>` on
        DIFFICULTY_TEST_POSTGRES_URL (default postgresql+psycopg2://postgres@127.0.0.1:5432/test),
        dropped on exit. Raises PostgresUnavailable when the server cannot be reached.
    database_for(kind, sqlite_path=None)
        context manager -> a database URL for a fixture parametrised over "sqlite" and
        "postgresql": sqlite_path as a URL (None: the server's default file in its data dir), or
        a fresh PostgreSQL database. PostgreSQL unreachable: the test is skipped, but fails when
        CI is set (CI must test PostgreSQL).
    wait_for_job(client, job_id, timeout=120, states=FINAL) -> the job JSON
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
from ci import skip_unless_ci

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_POSTGRES_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
FINAL = ("succeeded", "failed", "cancelled")


class PostgresUnavailable(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _environment(data_dir: Path, database_url: str | None, api_keys: dict[str, str] | None,
                 env: dict[str, str] | None) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("DIFFICULTY_")}
    out["HF_HUB_OFFLINE"] = "1"
    out["DIFFICULTY_DATA_DIR"] = str(data_dir)
    out["PYTHONPATH"] = str(ROOT) + os.pathsep + out.get("PYTHONPATH", "")
    if database_url:
        out["DIFFICULTY_DATABASE_URL"] = database_url
    if api_keys:
        out["DIFFICULTY_API_KEYS"] = ",".join(f"{tenant}:{key}" for tenant, key in api_keys.items())
    out.update(env or {})
    return out


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def running_server(
    data_dir: str | os.PathLike[str],
    database_url: str | None = None,
    api_keys: dict[str, str] | None = None,
    with_worker: bool = True,
    env: dict[str, str] | None = None,
    startup_timeout: float = 90.0,
) -> Iterator[str]:
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--data-dir", str(data_dir)]
    if not with_worker:
        command.append("--no-worker")
    log_path = data_dir.parent / f"server-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=_environment(data_dir, database_url, api_keys, env),
                                   stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(base_url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server did not start in {startup_timeout}s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.2)
        yield base_url
    finally:
        _stop(process)


@contextlib.contextmanager
def running_worker(
    data_dir: str | os.PathLike[str], database_url: str | None = None, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen]:
    data_dir = Path(data_dir)
    log_path = data_dir.parent / f"worker-{uuid.uuid4().hex[:8]}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker", "--data-dir", str(data_dir)],
            cwd=ROOT, env=_environment(data_dir, database_url, None, env), stdout=log, stderr=subprocess.STDOUT,
        )
    process.log_path = log_path  # type: ignore[attr-defined]
    try:
        yield process
    finally:
        _stop(process)


@contextlib.contextmanager
def postgres_database() -> Iterator[str]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    admin_url = make_url(os.environ.get("DIFFICULTY_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL))
    name = f"difficulty_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(admin_url, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        admin.dispose()
        raise PostgresUnavailable(f"PostgreSQL at {admin_url.render_as_string(hide_password=True)} "
                                  f"is unreachable: {exc}") from exc
    try:
        yield admin_url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def wait_for_job(client: httpx.Client, job_id: str, timeout: float = 120.0,
                 states: tuple[str, ...] = FINAL) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"/v1/jobs/{job_id}")
        response.raise_for_status()
        job = response.json()
        if job["state"] in states:
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {job['state']} after {timeout}s: {job}")
        time.sleep(0.2)


@contextlib.contextmanager
def database_for(kind: str, sqlite_path: Path | None = None) -> Iterator[str | None]:
    if kind == "sqlite":
        yield f"sqlite:///{sqlite_path}" if sqlite_path is not None else None
        return
    with contextlib.ExitStack() as stack:
        try:
            url = stack.enter_context(postgres_database())
        except PostgresUnavailable as exc:
            skip_unless_ci(f"{exc} (scripts/test-services.sh starts PostgreSQL)")
        yield url
