"""Suite-wide settings. Hubs are unreachable here: fail fast instead of retrying for ~47 s."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")



# -- shared fixtures ----------------------------------------------------------------------------

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402


def make_settings(data_dir: Path, **overrides):  # type: ignore[no-untyped-def]
    """Settings of the embedded default (SQLite in the data dir), fast polling for tests."""
    from service.settings import Settings, default_database_url

    values = {"data_dir": data_dir, "database_url": default_database_url(data_dir), "poll_seconds": 0.05}
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def api_client(tmp_path: Path) -> Iterator:
    """The app in-process (``TestClient``) with its in-process worker running queued jobs."""
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    with TestClient(create_app(make_settings(tmp_path / "data"))) as client:
        yield client


def wait_for_job(client, job_id: str, timeout: float = 120.0) -> dict:  # type: ignore[no-untyped-def]
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("succeeded", "failed", "cancelled"):
            return job
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} did not finish in {timeout}s")


def npy(array) -> bytes:  # type: ignore[no-untyped-def]
    """``np.save`` bytes, as an upload carries them."""
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def blobs(n: int, dim: int = 8, classes: int = 3, seed: int = 0):  # type: ignore[no-untyped-def]
    """Separable labelled features: class c is shifted by 3c along the first axis."""
    import numpy as np

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    features = rng.normal(size=(n, dim)).astype(np.float32)
    features[:, 0] += 3 * labels
    return features, labels


def upload_blobs(client, n: int, name: str = "blobs") -> str:  # type: ignore[no-untyped-def]
    """A dataset of ``blobs(n)`` uploaded as embeddings (encoder ``feats``); its ID."""
    features, labels = blobs(n)
    dataset_id = client.post("/v1/datasets", json={"name": name, "encoder": "feats"}).json()["id"]
    response = client.post(
        f"/v1/datasets/{dataset_id}/embeddings",
        files={"embeddings": ("e.npy", npy(features)), "labels": ("l", "\n".join(map(str, labels)))},
    )
    assert response.status_code == 201, response.text
    return dataset_id


# -- comparing the score tables of two fits (topology and container tests) ----------------------

SCORE_FLOAT_COLUMNS = ("rmd", "md_class", "md_agnostic", "rmd_min")
SCORE_EXACT_COLUMNS = ("sample_id", "label", "predicted_label")


def job_state(client, job_id: str) -> dict:  # type: ignore[no-untyped-def]
    response = client.get(f"/v1/jobs/{job_id}")
    assert response.status_code == 200, response.text
    return response.json()


def arrow_scores(client, dataset_id: str, num_rows: int):  # type: ignore[no-untyped-def]
    """The dataset's whole score table (Arrow export), sorted by sample ID."""
    import pyarrow as pa

    response = client.get(f"/v1/datasets/{dataset_id}/scores", params={"format": "arrow"})
    assert response.status_code == 200, response.text
    table = pa.ipc.open_stream(response.content).read_all()
    assert table.num_rows == num_rows
    return table.sort_by("sample_id")


def assert_same_scores(got, expected, tolerance: float) -> None:  # type: ignore[no-untyped-def]
    """IDs, labels and predictions equal; distances within ``tolerance`` relative to each
    column's scale (rmd crosses zero, so not element-wise relative)."""
    import numpy as np

    for column in SCORE_EXACT_COLUMNS:
        assert got.column(column).to_pylist() == expected.column(column).to_pylist(), column
    for column in SCORE_FLOAT_COLUMNS:
        a = got.column(column).to_numpy(zero_copy_only=False)
        b = expected.column(column).to_numpy(zero_copy_only=False)
        np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance * np.abs(b).max(), err_msg=column)
