"""HTTP client for the difficulty service: a dataset's scores by ID, cached per fit.

The trainer never imports ``service``; it shares only the wire format (docs/api.md). Scores
are fetched in bulk as an Arrow IPC stream and cached on disk under the dataset ID and the fit
ID, so a second training run costs one small metadata request, and a dataset fitted again (new
fit ID) is fetched again automatically.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.ipc as ipc

REQUIRED_COLUMNS = (
    "sample_id",
    "label",
    "rmd",
    "md_class",
    "md_agnostic",
    "rmd_min",
    "predicted_label",
)
ARROW_STREAM = "application/vnd.apache.arrow.stream"
# Transient on the server side: worth a retry. 4xx other than these are the caller's fault.
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


@dataclass(frozen=True)
class FetchedScores:
    table: pa.Table
    fit_id: str  # the fit that produced the table (a refit between requests is caught)
    dataset: dict[str, Any]  # the dataset's metadata, fetched with them


class DifficultyClientError(RuntimeError):
    """Base class: anything the client cannot turn into scores."""


class DatasetNotFoundError(DifficultyClientError):
    """404: no such dataset (or it belongs to another tenant; the service does not say which)."""


class DatasetNotFittedError(DifficultyClientError):
    """409 / ``fit: null``: the dataset exists but no fit has succeeded yet."""


class AuthenticationError(DifficultyClientError):
    """401/403: the API key is missing, unknown or refused."""


class ServiceUnavailableError(DifficultyClientError):
    """Transient failures (5xx, connection errors) persisted through every retry."""


def default_cache_dir() -> Path:
    env = os.environ.get("DIFFICULTY_TRAINER_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "difficulty-trainer"


def _safe_component(value: str) -> str:
    """A path component that cannot escape the cache directory, still readable when simple."""
    if re.fullmatch(r"[A-Za-z0-9._-]{1,80}", value) and value not in (".", ".."):
        return value
    return hashlib.sha256(value.encode()).hexdigest()[:32]


class DifficultyClient:
    """Fetches difficulty scores from a running service.

    ``scores(dataset_id)`` returns a ``pyarrow.Table`` with at least the columns of
    ``REQUIRED_COLUMNS``. Each call asks the service for the dataset's current fit (one small
    request, which also checks the API key) and reads the table from the disk cache when that fit
    was fetched before.
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        *,
        cache_dir: str | os.PathLike[str] | None = None,
        timeout: float = 60.0,
        retries: int = 4,
        backoff: float = 0.5,
        max_backoff: float = 10.0,
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self._sleep = sleep
        headers = {"User-Agent": "difficulty-trainer/0.1"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(
            base_url=self.base_url, headers=headers, timeout=timeout, transport=transport
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> DifficultyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- requests -----------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request with retries on transient failures; raises typed errors for the rest."""
        last = ""
        last_response: httpx.Response | None = None
        for attempt in range(self.retries + 1):
            if attempt:
                self._sleep(self._delay(attempt, last_response))
            last_response = None
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx.TransportError as exc:  # connection refused/reset, timeouts
                last = f"{type(exc).__name__}: {exc}"
                continue
            if response.status_code in RETRY_STATUS:
                last_response = response
                last = f"HTTP {response.status_code}: {_detail(response)}"
                continue
            if response.is_success:
                return response
            self._raise_for(response, path)
        raise ServiceUnavailableError(
            f"{method} {self.base_url}{path} failed after {self.retries + 1} attempts; last error: {last}"
        )

    def _delay(self, attempt: int, response: httpx.Response | None) -> float:
        # Honour Retry-After when the server gives one (429/503); else exponential with jitter
        # so several trainers restarting together do not hammer the service in lockstep.
        if response is not None:
            retry_after = response.headers.get("Retry-After", "")
            if retry_after.replace(".", "", 1).isdigit():
                return min(float(retry_after), self.max_backoff)
        base = min(self.backoff * 2 ** (attempt - 1), self.max_backoff)
        return base * (0.5 + random.random() / 2)

    def _raise_for(self, response: httpx.Response, path: str) -> None:
        detail = _detail(response)
        status = response.status_code
        url = f"{self.base_url}{path}"
        if status in (401, 403):
            raise AuthenticationError(
                f"the service refused the API key ({status}: {detail}); pass api_key= / --api-key "
                "with a key the service accepts"
            )
        if status == 404:
            raise DatasetNotFoundError(f"not found: {url} ({detail})")
        if status == 409 and "fit" in detail.lower():
            raise DatasetNotFittedError(
                f"{detail} ({url}); start a fit with POST /v1/datasets/{{id}}/fit and wait for "
                "the job to succeed"
            )
        raise DifficultyClientError(f"{response.request.method} {url} -> {status}: {detail}")

    # -- public API ---------------------------------------------------------------------------

    def dataset(self, dataset_id: str) -> dict[str, Any]:
        """The dataset's metadata (``id, name, encoder, num_items, classes, fit, ...``)."""
        return self._request("GET", f"/v1/datasets/{_quote(dataset_id)}").json()

    def scores(self, dataset_id: str, *, refresh: bool = False) -> pa.Table:
        """All scores of the dataset's latest fit, from the disk cache when already fetched."""
        return self.fetch_scores(dataset_id, refresh=refresh).table

    def fetch_scores(self, dataset_id: str, *, refresh: bool = False) -> FetchedScores:
        """The scores with the ID of the fit that produced them and the dataset's metadata
        (one metadata request, plus the table when it is not cached)."""
        info = self.dataset(dataset_id)
        fit = info.get("fit")
        if not fit:
            raise DatasetNotFittedError(
                f"dataset {dataset_id!r} has no successful fit yet; start one with "
                f"POST /v1/datasets/{dataset_id}/fit and wait for the job to succeed"
            )
        fit_id = str(fit["id"])
        cached = self._cache_path(dataset_id, fit_id)
        if cached.exists() and not refresh:
            try:
                return FetchedScores(_read_stream(cached.read_bytes()), fit_id, info)
            except (pa.ArrowInvalid, OSError):
                cached.unlink(missing_ok=True)  # a damaged cache entry is refetched, not trusted
        response = self._request(
            "GET",
            f"/v1/datasets/{_quote(dataset_id)}/scores",
            params={"format": "arrow"},
            headers={"Accept": ARROW_STREAM},
        )
        table = _read_stream(response.content)
        missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
        if missing:
            raise DifficultyClientError(f"score table from the service lacks columns {missing}")
        # The dataset may have been refitted between the two requests: key the cache by the fit
        # that actually produced these bytes.
        served_fit = response.headers.get("X-Fit-Id", fit_id)
        self._write_cache(self._cache_path(dataset_id, served_fit), response.content)
        return FetchedScores(table, served_fit, info)

    def _cache_path(self, dataset_id: str, fit_id: str) -> Path:
        # The base URL is part of the key: two services may both have a dataset "1".
        server = hashlib.sha256(self.base_url.encode()).hexdigest()[:16]
        return (
            self.cache_dir
            / server
            / _safe_component(dataset_id)
            / f"{_safe_component(fit_id)}.arrows"
        )

    @staticmethod
    def _write_cache(path: Path, data: bytes) -> None:
        # Atomic: a crashed or concurrent writer never leaves a truncated cache entry behind.
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _read_stream(data: bytes) -> pa.Table:
    try:
        return ipc.open_stream(pa.py_buffer(data)).read_all()
    except pa.ArrowInvalid as exc:
        raise pa.ArrowInvalid(f"not an Arrow IPC stream: {exc}") from exc


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text[:200] or response.reason_phrase
    if isinstance(body, dict) and "detail" in body:
        return str(body["detail"])
    return str(body)[:200]


def _quote(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="")
