"""Per-tenant quotas: one tenant cannot create unlimited datasets or uploads, nor fill the
global FIFO queue with fits (before: 500 queued fits of one tenant starved everyone). Other
tenants are unaffected. Cost: one in-process app without a worker (~1 s).
"""

from __future__ import annotations

import io

import numpy as np
from conftest import blobs, make_settings
from fastapi.testclient import TestClient

from service.api.app import create_app

KEYS = {"mallory-key-0123456789": "mallory", "alice-key-0123456789ab": "alice"}


def test_quotas_per_tenant(tmp_path):
    settings = make_settings(tmp_path / "data", api_keys=KEYS, max_datasets_per_tenant=3,
                             max_uploads_per_dataset=2, max_active_jobs_per_tenant=2)
    mallory = {"Authorization": "Bearer mallory-key-0123456789"}
    alice = {"Authorization": "Bearer alice-key-0123456789ab"}
    features, labels = blobs(30)
    buffer = io.BytesIO()
    np.save(buffer, features)

    def upload(c: TestClient, dataset_id: str, headers: dict, tag: str):  # type: ignore[no-untyped-def]
        return c.post(f"/v1/datasets/{dataset_id}/embeddings", headers=headers,
                      files={"embeddings": ("e.npy", buffer.getvalue()), "labels": ("l", "\n".join(map(str, labels))),
                             "ids": ("i", "\n".join(f"{tag}{i}" for i in range(30)))})

    with TestClient(create_app(settings, run_worker=False)) as c:
        ids = [c.post("/v1/datasets", json={"name": f"d{i}", "encoder": "feats"}, headers=mallory).json()["id"]
               for i in range(3)]
        refused = c.post("/v1/datasets", json={"name": "d3", "encoder": "feats"}, headers=mallory)
        assert refused.status_code == 413 and "DIFFICULTY_MAX_DATASETS_PER_TENANT" in refused.json()["detail"]
        assert upload(c, ids[0], mallory, "a").status_code == 201
        assert upload(c, ids[0], mallory, "b").status_code == 201
        third = upload(c, ids[0], mallory, "c")
        assert third.status_code == 413 and "DIFFICULTY_MAX_UPLOADS_PER_DATASET" in third.json()["detail"]
        for dataset_id in ids[1:]:
            assert upload(c, dataset_id, mallory, "a").status_code == 201
        # No worker runs: fits stay queued. Two are allowed, the third is refused.
        assert c.post(f"/v1/datasets/{ids[0]}/fit", headers=mallory).status_code == 202
        assert c.post(f"/v1/datasets/{ids[1]}/fit", headers=mallory).status_code == 202
        queued = c.post(f"/v1/datasets/{ids[2]}/fit", headers=mallory)
        assert queued.status_code == 413 and "DIFFICULTY_MAX_ACTIVE_JOBS_PER_TENANT" in queued.json()["detail"]
        # Alice is not affected by mallory's quota.
        mine = c.post("/v1/datasets", json={"name": "a", "encoder": "feats"}, headers=alice).json()["id"]
        assert upload(c, mine, alice, "a").status_code == 201
        assert c.post(f"/v1/datasets/{mine}/fit", headers=alice).status_code == 202
        # Cancelling one of mallory's frees a slot.
        job_id = c.get(f"/v1/datasets/{ids[0]}/jobs", headers=mallory).json()[0]["id"]
        assert c.post(f"/v1/jobs/{job_id}/cancel", headers=mallory).status_code == 200
        assert c.get(f"/v1/jobs/{job_id}", headers=mallory).json()["state"] == "cancelled"  # it was queued
        assert c.post(f"/v1/datasets/{ids[2]}/fit", headers=mallory).status_code == 202
