"""DifficultyClient against a fake of the service's wire contract (an ``httpx.MockTransport``):
bulk Arrow scores, caching per fit, retries with backoff, and the typed errors. One test keeps a
real socket: a refused connection. About 1 s in all."""

from __future__ import annotations

import socket

import httpx
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from trainer.client import (
    AuthenticationError,
    DatasetNotFittedError,
    DatasetNotFoundError,
    DifficultyClient,
    DifficultyClientError,
    ServiceUnavailableError,
)

KEY = "secret-key"


def scores_stream(fit: str) -> bytes:
    # The score values depend on the fit so a test can tell which fit it got.
    offset = 0.0 if fit == "fit-1" else 100.0
    table = pa.table(
        {
            "sample_id": ["a/1.png", "b/2.png", "a/3.png"],
            "label": ["a", "b", "a"],
            "rmd": [1.0 + offset, -2.0 + offset, 0.5 + offset],
            "md_class": [10.0, 8.0, 9.0],
            "md_agnostic": [9.0, 10.0, 8.5],
            "rmd_min": [0.0, -2.0, 0.5],
            "predicted_label": ["b", "b", "a"],
        }
    )
    sink = pa.BufferOutputStream()
    with ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


class FakeService:
    """State of the fake: datasets, their current fit, failures to inject, request log."""

    def __init__(self) -> None:
        self.fits: dict[str, str | None] = {"ds1": "fit-1", "unfitted": None}
        self.fail_next = 0  # answer this many requests with 503 first
        self.log: list[str] = []
        # A refit landing between the metadata request and the scores request.
        self.refit_before_scores: str | None = None


def make_transport(state: FakeService) -> httpx.MockTransport:
    """The fake service as an httpx transport: the client's own request and response handling
    (headers, status codes, Arrow bodies, retries) runs for real, without a socket in between;
    the process boundary is the end-to-end test's business (tests/test_trainer_e2e.py)."""

    def json_response(status: int, body: object) -> httpx.Response:
        return httpx.Response(status, json=body)

    def handle(request: httpx.Request) -> httpx.Response:
        url = request.url
        query = url.query.decode()
        state.log.append(url.path + ("?" + query if query else ""))
        if request.method != "GET":
            return json_response(405, {"detail": "method not allowed"})
        if state.fail_next > 0:
            state.fail_next -= 1
            return json_response(503, {"detail": "try again"})
        if request.headers.get("Authorization") != f"Bearer {KEY}":
            return json_response(401, {"detail": "missing or unknown API key"})
        parts = url.path.strip("/").split("/")
        if len(parts) < 3 or parts[:2] != ["v1", "datasets"] or parts[2] not in state.fits:
            return json_response(404, {"detail": "dataset not found"})
        fit = state.fits[parts[2]]
        if len(parts) == 3:
            body: dict[str, object] = {"id": parts[2], "name": parts[2], "encoder": "precomputed",
                                       "num_items": 3}  # fmt: skip
            body["fit"] = None if fit is None else {"id": fit, "created_at": "2026-01-01T00:00:00Z"}
            return json_response(200, body)
        if parts[3:] == ["scores"] and "format=arrow" in query:
            if state.refit_before_scores is not None:
                fit = state.fits[parts[2]] = state.refit_before_scores
                state.refit_before_scores = None
            if fit is None:
                return json_response(409, {"detail": "dataset is not fitted yet"})
            return httpx.Response(
                200, content=scores_stream(fit),
                headers={"Content-Type": "application/vnd.apache.arrow.stream", "X-Fit-Id": fit},
            )  # fmt: skip
        return json_response(404, {"detail": "no route"})

    return httpx.MockTransport(handle)


@pytest.fixture()
def service():
    state = FakeService()
    state.base_url = "http://difficulty.test"
    state.transport = make_transport(state)
    return state


def client_for(service, tmp_path, key=KEY, **kw) -> DifficultyClient:
    sleeps: list[float] = []
    client = DifficultyClient(
        service.base_url, key, cache_dir=tmp_path / "cache", sleep=sleeps.append,
        transport=service.transport, **kw,
    )  # fmt: skip
    client.sleeps = sleeps  # type: ignore[attr-defined]
    return client


def test_fetch_scores_then_cache_hit(service, tmp_path):
    with client_for(service, tmp_path) as client:
        table = client.scores("ds1")
        assert table.column("sample_id").to_pylist() == ["a/1.png", "b/2.png", "a/3.png"]
        assert table.column("rmd").to_pylist() == [1.0, -2.0, 0.5]
        assert sum("/scores" in p for p in service.log) == 1
        again = client.scores("ds1")
        assert again.equals(table)
        # Second call: metadata only (checks the key and the fit), no second bulk download.
        assert sum("/scores" in p for p in service.log) == 1
        assert service.log.count("/v1/datasets/ds1") == 2


def test_refetch_after_new_fit(service, tmp_path):
    with client_for(service, tmp_path) as client:
        assert client.scores("ds1").column("rmd")[0].as_py() == 1.0
        service.fits["ds1"] = "fit-2"  # the dataset was fitted again
        assert client.scores("ds1").column("rmd")[0].as_py() == 101.0
        assert sum("/scores" in p for p in service.log) == 2
        # refresh=True bypasses the cache.
        client.scores("ds1", refresh=True)
        assert sum("/scores" in p for p in service.log) == 3


def test_fetch_scores_names_the_fit_that_served_them(service, tmp_path):
    with client_for(service, tmp_path) as client:
        service.refit_before_scores = "fit-2"  # metadata says fit-1, the table comes from fit-2
        fetched = client.fetch_scores("ds1")
        assert fetched.fit_id == "fit-2" and fetched.table.column("rmd")[0].as_py() == 101.0
        assert fetched.dataset["id"] == "ds1"
        assert sum(p == "/v1/datasets/ds1" for p in service.log) == 1  # one metadata request
        # The cache is keyed by the serving fit: asking again (metadata now fit-2) is a hit.
        again = client.fetch_scores("ds1")
        assert again.fit_id == "fit-2" and sum("/scores" in p for p in service.log) == 1


def test_cache_is_shared_across_clients_and_survives_corruption(service, tmp_path):
    with client_for(service, tmp_path) as client:
        client.scores("ds1")
    entries = list((tmp_path / "cache").rglob("*.arrows"))
    assert len(entries) == 1
    entries[0].write_bytes(b"garbage")
    with client_for(service, tmp_path) as client:
        assert client.scores("ds1").num_rows == 3  # refetched, not trusted
    assert sum("/scores" in p for p in service.log) == 2


def test_retries_transient_failures_with_backoff(service, tmp_path):
    service.fail_next = 2
    with client_for(service, tmp_path, retries=3, backoff=0.5) as client:
        assert client.scores("ds1").num_rows == 3
        assert len(client.sleeps) == 2
        # Exponential with jitter in [0.5, 1] x base: base 0.5 then 1.0.
        assert 0.25 <= client.sleeps[0] <= 0.5 and 0.5 <= client.sleeps[1] <= 1.0


def test_gives_up_after_retries(service, tmp_path):
    service.fail_next = 100
    with (
        client_for(service, tmp_path, retries=2) as client,
        pytest.raises(ServiceUnavailableError, match="3 attempts.*503"),
    ):
        client.scores("ds1")


def test_connection_refused_is_retried_then_reported(tmp_path):
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sleeps: list[float] = []
    client = DifficultyClient(
        f"http://127.0.0.1:{port}", KEY, cache_dir=tmp_path, retries=2, sleep=sleeps.append
    )
    with pytest.raises(ServiceUnavailableError, match="ConnectError"):
        client.scores("ds1")
    assert len(sleeps) == 2


def test_unknown_dataset(service, tmp_path):
    with client_for(service, tmp_path) as client, pytest.raises(DatasetNotFoundError):
        client.scores("nope")


def test_not_fitted(service, tmp_path):
    with client_for(service, tmp_path) as client, pytest.raises(DatasetNotFittedError, match="fit"):
        client.scores("unfitted")


def test_refused_key(service, tmp_path):
    for key in ("wrong", None):
        with client_for(service, tmp_path, key=key) as client, pytest.raises(AuthenticationError):
            client.scores("ds1")
    assert issubclass(AuthenticationError, DifficultyClientError)


def test_dataset_ids_cannot_escape_cache(service, tmp_path):
    service.fits["../../etc"] = "fit-1"
    with client_for(service, tmp_path) as client:
        path = client._cache_path("../../etc", "../x")
        assert (tmp_path / "cache") in path.parents
