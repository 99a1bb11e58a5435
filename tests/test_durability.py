"""What the data dir keeps over time: superseded fits are retired (DIFFICULTY_KEEP_FITS), and
folders a crash left without a database row are collected at start-up after a grace period.

Before: every fit kept its folder and row forever, and only stale spool folders were swept.
Cost: ~5 s (four small fits in an in-process app).
"""

from __future__ import annotations

import io

import numpy as np
from conftest import blobs, make_settings, wait_for_job
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.api.app import create_app
from service.storage.database import Fit


def _dataset(c: TestClient, n: int = 120) -> str:
    features, labels = blobs(n)
    buffer = io.BytesIO()
    np.save(buffer, features)
    dataset_id = c.post("/v1/datasets", json={"name": "d", "encoder": "feats"}).json()["id"]
    response = c.post(f"/v1/datasets/{dataset_id}/embeddings",
                      files={"embeddings": ("e.npy", buffer.getvalue()), "labels": ("l", "\n".join(map(str, labels)))})
    assert response.status_code == 201, response.text
    return dataset_id


def _fit(c: TestClient, dataset_id: str) -> str:
    response = c.post(f"/v1/datasets/{dataset_id}/fit")
    assert response.status_code == 202, response.text
    job = wait_for_job(c, response.json()["job_id"])
    assert job["state"] == "succeeded", job
    return job["result"]["fit_id"]


def test_superseded_fits_are_retired_beyond_the_kept_number(tmp_path):
    data_dir = tmp_path / "data"
    with TestClient(create_app(make_settings(data_dir, keep_fits=1))) as c:
        dataset_id = _dataset(c)
        other_id = _dataset(c)
        other_fit = _fit(c, other_id)
        fits = [_fit(c, dataset_id) for _ in range(3)]
        folders = {p.name for p in (data_dir / "datasets" / dataset_id / "fits").iterdir()}
        assert folders == set(fits[1:])  # the current fit and one before it
        with c.app.state.ctx.db() as session:
            rows = set(session.scalars(select(Fit.id).where(Fit.dataset_id == dataset_id)))
            assert rows == set(fits[1:])
            assert session.get(Fit, other_fit) is not None  # another dataset's fit is untouched
        assert (data_dir / "datasets" / other_id / "fits" / other_fit).is_dir()
        response = c.get(f"/v1/datasets/{dataset_id}/scores")
        assert response.status_code == 200 and response.headers["X-Fit-Id"] == fits[-1]
        assert c.get(f"/v1/datasets/{dataset_id}").json()["fit"]["id"] == fits[-1]
