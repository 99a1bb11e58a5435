"""Hostile data shapes: an 800 KB upload of shape (10, 40000) made the fit allocate ~64 GB
(N_FOLDS x D x D float64 sums). D, K and K-close-to-N are refused at upload and again before a
fit is queued, with the limit and its setting named.

Cost: in-process apps (~1 s each, three of them), no fit runs.
"""

from __future__ import annotations

import io

import numpy as np
from conftest import make_settings
from fastapi.testclient import TestClient

from service.api.app import create_app


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def upload(c: TestClient, dataset_id: str, features: np.ndarray, labels: list[str]):  # type: ignore[no-untyped-def]
    return c.post(f"/v1/datasets/{dataset_id}/embeddings",
                  files={"embeddings": ("e.npy", npy(features)), "labels": ("l", "\n".join(labels))})


def test_absurd_dimensions_and_class_counts_are_refused_at_upload(api_client):
    c = api_client
    dataset_id = c.post("/v1/datasets", json={"name": "target", "encoder": "feats"}).json()["id"]
    wide = np.zeros((10, 40000), dtype=np.float16)  # 800 KB, as in the audit
    response = upload(c, dataset_id, wide, ["a", "b"] * 5)
    assert response.status_code == 413, response.text
    assert "D=40000" in response.json()["detail"] and "DIFFICULTY_MAX_DIM" in response.json()["detail"]
    # One class per sample (K = N): no class has a distribution; 20,000 classes is over the limit.
    rng = np.random.default_rng(0)
    unique = upload(c, dataset_id, rng.normal(size=(100, 4)).astype(np.float32), [f"c{i}" for i in range(100)])
    assert unique.status_code == 422 and "DIFFICULTY_MAX_CLASS_FRACTION" in unique.json()["detail"], unique.text
    many = upload(c, dataset_id, rng.normal(size=(40000, 2)).astype(np.float32), [f"c{i % 20000}" for i in range(40000)])
    assert many.status_code == 413 and "DIFFICULTY_MAX_CLASSES" in many.json()["detail"], many.text
    # A sane upload of the same dataset still works, and small K is always allowed.
    assert upload(c, dataset_id, rng.normal(size=(6, 4)).astype(np.float32), list("abcdef")).status_code == 201
    assert c.get(f"/v1/datasets/{dataset_id}").json()["num_items"] == 6


def test_memory_budget_counts_classes_and_dimensions_together(tmp_path):
    # 8 x 5 x (K x D + D x D) bytes: D=1000, K=600 -> 64 MB; a 32 MB budget refuses it.
    settings = make_settings(tmp_path / "data", max_fit_bytes=32 * 1024**2)
    with TestClient(create_app(settings, run_worker=False)) as c:
        dataset_id = c.post("/v1/datasets", json={"name": "t", "encoder": "feats"}).json()["id"]
        features = np.zeros((1200, 1000), dtype=np.float32)
        response = upload(c, dataset_id, features, [f"c{i % 600}" for i in range(1200)])
        assert response.status_code == 413 and "DIFFICULTY_MAX_FIT_BYTES" in response.json()["detail"], response.text


def test_limits_are_checked_again_before_a_fit_is_queued(tmp_path):
    """Uploads accepted under one limit, the operator lowers it: the fit is refused, not queued."""
    data_dir = tmp_path / "data"
    rng = np.random.default_rng(1)
    with TestClient(create_app(make_settings(data_dir), run_worker=False)) as c:
        dataset_id = c.post("/v1/datasets", json={"name": "t", "encoder": "feats"}).json()["id"]
        labels = [f"c{i % 40}" for i in range(400)]
        assert upload(c, dataset_id, rng.normal(size=(400, 64)).astype(np.float32), labels).status_code == 201
    with TestClient(create_app(make_settings(data_dir, max_dim=32, max_classes=20), run_worker=False)) as c:
        response = c.post(f"/v1/datasets/{dataset_id}/fit")
        assert response.status_code == 413 and "DIFFICULTY_MAX_DIM" in response.json()["detail"], response.text
        assert c.get(f"/v1/datasets/{dataset_id}/jobs").json() == []
    with TestClient(create_app(make_settings(data_dir, max_classes=20), run_worker=False)) as c:
        response = c.post(f"/v1/datasets/{dataset_id}/fit")
        assert response.status_code == 413 and "DIFFICULTY_MAX_CLASSES" in response.json()["detail"], response.text
    with TestClient(create_app(make_settings(data_dir), run_worker=False)) as c:
        assert c.post(f"/v1/datasets/{dataset_id}/fit").status_code == 202
