"""Service settings: environment variables, overridden by command-line flags.

Every setting has an environment variable ``DIFFICULTY_<NAME>`` so that the API process and
separately started workers agree without sharing a config file.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.domain import ExecutorKind
from service.encoders.names import DEFAULT_ALLOWED_ENCODERS, DEFAULT_ENCODER
from service.storage import layout

ANONYMOUS_TENANT = "default"  # the one tenant of a server without API keys


class SettingsError(ValueError):  # a start-up error of the operator, not a request's
    """A setting is malformed; the message names the variable and the expected form."""


# API keys are compared in constant time but can still be guessed when short.
MIN_API_KEY_LENGTH = 16
# A named tenant: what may stand before the one ':' of a 'tenant:key' entry.
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MAKE_KEY = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


def parse_api_keys(raw: str | None) -> dict[str, str]:
    """``DIFFICULTY_API_KEYS`` -> {key: tenant}.

    Comma-separated entries, each ``tenant:key`` (the tenant is named) or a bare ``key`` (the
    tenant is a digest of the key, so the key itself is never written to the database). The
    format rule: a key never contains ':' or ','; an entry with one ':' is ``tenant:key`` with a
    tenant name (letters, digits, '.', '_', '-'; at most 64). Anything else (two ':', a bare key
    with a ':' whose left part is no tenant name) is a start-up error rather than a silent split;
    so is a key shorter than MIN_API_KEY_LENGTH. Messages name the entry by position and never
    echo a key.
    """
    keys: dict[str, str] = {}
    entries = [e.strip() for e in (raw or "").split(",")]
    for number, entry in enumerate(entries, start=1):
        if not entry:
            continue
        where = f"DIFFICULTY_API_KEYS entry {number}"
        if entry.count(":") > 1:
            raise SettingsError(f"{where} has more than one ':': write 'tenant:key' or a bare key; "
                                "a key must not contain ':'")
        tenant, sep, key = (part.strip() for part in entry.partition(":"))
        if not sep:
            key, tenant = entry, "key-" + hashlib.sha256(entry.encode()).hexdigest()[:12]
        elif not TENANT_NAME.match(tenant):
            raise SettingsError(f"{where}: the part before ':' is not a tenant name (letters, digits, '.', '_', "
                                "'-'; at most 64): write 'tenant:key'; a bare key must not contain ':'")
        if not key:
            raise SettingsError(f"{where} is malformed: use 'tenant:key' or 'key'")
        if len(key) < MIN_API_KEY_LENGTH:
            owner = f" (tenant {tenant!r})" if sep else ""
            raise SettingsError(f"{where}{owner}: the key has {len(key)} characters; API keys need at least "
                                f"{MIN_API_KEY_LENGTH} (make one with: {_MAKE_KEY})")
        if key in keys and keys[key] != tenant:
            raise SettingsError("DIFFICULTY_API_KEYS gives the same key to two tenants")
        keys[key] = tenant
    return keys


def _env_number(name: str, default: float, kind: type[int] | type[float]) -> Any:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return kind(raw)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise SettingsError(f"{name} must be {what}, got {raw!r}") from None


def _env_int(name: str, default: int) -> int:
    return _env_number(name, default, int)


def _env_float(name: str, default: float) -> float:
    return _env_number(name, default, float)


def _env_list(name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    # Comma-separated names; unset or empty keeps the default.
    raw = os.environ.get(name)
    if not raw or not raw.strip():
        return default
    return tuple(item.strip() for item in raw.split(",") if item.strip())


@dataclass(frozen=True)
class Settings:
    data_dir: Path
    database_url: str
    api_keys: dict[str, str] = field(default_factory=dict)
    max_upload_bytes: int = 8 * 1024**3
    # Archive limits (zip/tar bombs): members and total uncompressed bytes.
    max_archive_members: int = 2_000_000
    max_archive_bytes: int = 64 * 1024**3
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 10.0
    poll_seconds: float = 1.0
    # Rows per embedding-store chunk written by jobs (the unit of resumption).
    chunk_rows: int = 65536
    image_chunk_rows: int = 1024
    # Test-only: sleep this long after each finished chunk, so a test can kill a worker mid-job.
    chunk_delay_seconds: float = 0.0
    # kNN label agreement is exact kNN over the whole dataset: skipped above this many samples.
    knn_max_items: int = 20_000
    knn_k: int = 10
    # The in-memory neighbour indexes (neighbour, sample and label-issue routes) together hold at
    # most this many bytes; one fit's index larger than that is refused (413).
    neighbor_index_max_bytes: int = 4 * 1024**3
    # New items scored synchronously per request.
    score_max_items: int = 100_000
    default_encoder: str = DEFAULT_ENCODER
    device: str = "auto"
    # Where fit jobs embed images: "local" (this process) or "ray" (a Ray cluster at
    # RAY_ADDRESS, or a local one when unset). Ray is imported only for "ray".
    executor: ExecutorKind = ExecutorKind.LOCAL
    ray_address: str | None = None
    ray_actors: int | None = None  # encoder actors; None = one per GPU in the cluster, else 1
    # Request limits (api.limits): a non-upload body (JSON) is refused above this many bytes
    # while it streams, before the route reads it.
    max_request_bytes: int = 64 * 1024
    # Data shape limits, checked at upload and before a fit is queued: the fit holds
    # N_FOLDS x (K x D + D x D) float64 running sums, so D and K bound its memory.
    max_dim: int = 8192
    max_classes: int = 10_000
    # More than 16 classes and fewer than 1/fraction samples per class on average: refused.
    max_class_fraction: float = 0.5
    max_fit_bytes: int = 16 * 1024**3
    # Image encoders tenants may name (operator's choice; the default encoder is always allowed).
    allowed_encoders: tuple[str, ...] = DEFAULT_ALLOWED_ENCODERS
    # A job running longer than this is failed by its worker's heartbeat (0 = no limit).
    max_job_seconds: float = 24 * 3600.0
    # A job that reports no progress for this long is stopped as stuck (0 = never).
    job_stall_seconds: float = 3600.0
    # Per-tenant quotas (413 naming the setting): datasets, uploads per dataset, and fit jobs
    # queued or running at once (one tenant's 500 fits cannot fill the global FIFO queue).
    max_datasets_per_tenant: int = 1000
    max_uploads_per_dataset: int = 1000
    max_active_jobs_per_tenant: int = 4
    # Uploads in flight per API process, in all and per tenant (more: 503 with Retry-After),
    # and how long a request body may send nothing before it is refused (408; slow clients).
    max_concurrent_uploads: int = 16
    max_uploads_per_tenant: int = 4
    body_idle_seconds: float = 300.0
    # /metrics without an API key when keys are set (a scraper on a private network).
    metrics_public: bool = False
    # Superseded fits kept besides the current one (their folders and rows); older ones are
    # deleted when a new fit is recorded. 0 keeps only the current fit.
    keep_fits: int = 2
    # A folder without a database row (a crash between rename and commit) is removed at start-up
    # once nothing in it changed for this long (an upload or fit being committed is never taken).
    orphan_grace_seconds: float = 3600.0
    # The HTTP server (`difficulty serve`, uvicorn): connections at once (more: 503), seconds an
    # idle keep-alive connection is held, and the request line plus headers in bytes (more: 400,
    # connection closed; h11, whose limit holds, rather than httptools, which buffered 61 MiB).
    http_max_connections: int = 1000
    http_keep_alive_seconds: int = 5
    http_max_header_bytes: int = 64 * 1024

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys)

    @property
    def tmp_dir(self) -> Path:
        # Uploads are spooled here, on the data dir's file system, so the final rename is atomic
        # and nothing is written outside the data dir (no system /tmp).
        return layout.tmp_dir(self.data_dir)


def default_database_url(data_dir: Path) -> str:
    return f"sqlite:///{layout.database_path(data_dir).resolve()}"


def load_settings(data_dir: str | os.PathLike[str] | None = None) -> Settings:
    """Settings from the environment; ``data_dir`` (a CLI flag) wins over DIFFICULTY_DATA_DIR."""
    root = Path(data_dir or os.environ.get("DIFFICULTY_DATA_DIR") or "./data").resolve()
    lease_seconds = _env_float("DIFFICULTY_LEASE_SECONDS", Settings.lease_seconds)
    return Settings(
        data_dir=root,
        database_url=os.environ.get("DIFFICULTY_DATABASE_URL") or default_database_url(root),
        api_keys=parse_api_keys(os.environ.get("DIFFICULTY_API_KEYS")),
        max_upload_bytes=_env_int("DIFFICULTY_MAX_UPLOAD_BYTES", Settings.max_upload_bytes),
        max_archive_members=_env_int("DIFFICULTY_MAX_ARCHIVE_MEMBERS", Settings.max_archive_members),
        max_archive_bytes=_env_int("DIFFICULTY_MAX_ARCHIVE_BYTES", Settings.max_archive_bytes),
        lease_seconds=lease_seconds,
        heartbeat_seconds=_env_float(
            "DIFFICULTY_HEARTBEAT_SECONDS", min(Settings.heartbeat_seconds, lease_seconds / 3)
        ),
        poll_seconds=_env_float("DIFFICULTY_POLL_SECONDS", Settings.poll_seconds),
        chunk_rows=max(1, _env_int("DIFFICULTY_CHUNK_ROWS", Settings.chunk_rows)),
        image_chunk_rows=max(1, _env_int("DIFFICULTY_IMAGE_CHUNK_ROWS", Settings.image_chunk_rows)),
        chunk_delay_seconds=_env_float("DIFFICULTY_CHUNK_DELAY_SECONDS", 0.0),
        knn_max_items=_env_int("DIFFICULTY_KNN_MAX_ITEMS", Settings.knn_max_items),
        knn_k=max(1, _env_int("DIFFICULTY_KNN_K", Settings.knn_k)),
        neighbor_index_max_bytes=_env_int("DIFFICULTY_NEIGHBOR_INDEX_MAX_BYTES", Settings.neighbor_index_max_bytes),
        score_max_items=_env_int("DIFFICULTY_SCORE_MAX_ITEMS", Settings.score_max_items),
        default_encoder=os.environ.get("DIFFICULTY_DEFAULT_ENCODER") or DEFAULT_ENCODER,
        device=os.environ.get("DIFFICULTY_DEVICE") or "auto",
        executor=_executor(os.environ.get("DIFFICULTY_EXECUTOR") or "local"),
        ray_address=os.environ.get("RAY_ADDRESS") or None,
        ray_actors=_env_int("DIFFICULTY_RAY_ACTORS", 0) or None,
        max_request_bytes=_env_int("DIFFICULTY_MAX_REQUEST_BYTES", Settings.max_request_bytes),
        max_dim=_env_int("DIFFICULTY_MAX_DIM", Settings.max_dim),
        max_classes=_env_int("DIFFICULTY_MAX_CLASSES", Settings.max_classes),
        max_class_fraction=_env_float("DIFFICULTY_MAX_CLASS_FRACTION", Settings.max_class_fraction),
        max_fit_bytes=_env_int("DIFFICULTY_MAX_FIT_BYTES", Settings.max_fit_bytes),
        allowed_encoders=_env_list("DIFFICULTY_ALLOWED_ENCODERS", Settings.allowed_encoders),
        max_job_seconds=_env_float("DIFFICULTY_MAX_JOB_SECONDS", Settings.max_job_seconds),
        job_stall_seconds=_env_float("DIFFICULTY_JOB_STALL_SECONDS", Settings.job_stall_seconds),
        max_datasets_per_tenant=_env_int("DIFFICULTY_MAX_DATASETS_PER_TENANT", Settings.max_datasets_per_tenant),
        max_uploads_per_dataset=_env_int("DIFFICULTY_MAX_UPLOADS_PER_DATASET", Settings.max_uploads_per_dataset),
        max_active_jobs_per_tenant=_env_int(
            "DIFFICULTY_MAX_ACTIVE_JOBS_PER_TENANT", Settings.max_active_jobs_per_tenant
        ),
        max_concurrent_uploads=_env_int("DIFFICULTY_MAX_CONCURRENT_UPLOADS", Settings.max_concurrent_uploads),
        max_uploads_per_tenant=_env_int("DIFFICULTY_MAX_UPLOADS_PER_TENANT", Settings.max_uploads_per_tenant),
        body_idle_seconds=_env_float("DIFFICULTY_BODY_IDLE_SECONDS", Settings.body_idle_seconds),
        metrics_public=_env_int("DIFFICULTY_METRICS_PUBLIC", 0) != 0,
        keep_fits=max(0, _env_int("DIFFICULTY_KEEP_FITS", Settings.keep_fits)),
        orphan_grace_seconds=_env_float("DIFFICULTY_ORPHAN_GRACE_SECONDS", Settings.orphan_grace_seconds),
        http_max_connections=max(1, _env_int("DIFFICULTY_HTTP_MAX_CONNECTIONS", Settings.http_max_connections)),
        http_keep_alive_seconds=max(1, _env_int("DIFFICULTY_HTTP_KEEP_ALIVE_SECONDS", Settings.http_keep_alive_seconds)),
        http_max_header_bytes=max(4096, _env_int("DIFFICULTY_HTTP_MAX_HEADER_BYTES", Settings.http_max_header_bytes)),
    )


def _executor(raw: str) -> ExecutorKind:
    try:
        return ExecutorKind(raw)
    except ValueError:
        names = " or ".join(repr(k.value) for k in ExecutorKind)
        raise SettingsError(f"DIFFICULTY_EXECUTOR must be {names}, got {raw!r}") from None
