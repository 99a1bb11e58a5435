"""Hostile bytes that reach storage: NUL in IDs, names and queries on PostgreSQL (which cannot
store or even compare a NUL), an over-long multipart boundary (was a 500 that left a spool
folder behind), and a full disk while an upload is stored (was "malformed multipart body").

Cost: one server on a fresh PostgreSQL database (~5 s; skipped without PostgreSQL unless CI),
the rest in process (~1 s).
"""

from __future__ import annotations

import builtins
import io
from pathlib import Path

import httpx
import numpy as np
from apiserver import database_for, running_server
from conftest import blobs

from service.api import multipart

KEYS = {"eve": "eve-key-0123456789abcdef"}


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_nul_never_reaches_postgresql(tmp_path):
    with database_for("postgresql") as db_url, running_server(
        tmp_path / "data", database_url=db_url, api_keys=KEYS, with_worker=False
    ) as url, httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEYS['eve']}"}, timeout=60) as c:
        dataset_id = c.post("/v1/datasets", json={"name": "ok", "encoder": "feats"}).json()["id"]
        answers = {
            "dataset id": c.get("/v1/datasets/a%00b"),
            "job id": c.get("/v1/jobs/a%00b"),
            "scores of id": c.get("/v1/datasets/a%00b/scores"),
            "label filter": c.get(f"/v1/datasets/{dataset_id}/scores", params={"label": "a\x00b"}),
            "dataset name": c.post("/v1/datasets", json={"name": "a\x00b", "encoder": "feats"}),
            "encoder name": c.post("/v1/datasets", json={"name": "x", "encoder": "fe\x00ats"}),
        }
        features, labels = blobs(30)
        answers["label with NUL"] = c.post(
            f"/v1/datasets/{dataset_id}/embeddings",
            files={"embeddings": ("e.npy", npy(features)), "labels": ("l", "\n".join(["a\x00"] * 30))},
        )
        for what, response in answers.items():
            assert 400 <= response.status_code < 500, (what, response.status_code, response.text)
            assert "detail" in response.json(), what
        assert c.get("/v1/datasets").status_code == 200
        assert len(c.get("/v1/datasets").json()["items"]) == 1


def test_overlong_multipart_boundary_is_a_4xx_and_leaves_nothing(api_client, tmp_path):
    dataset_id = api_client.post("/v1/datasets", json={"name": "x", "encoder": "feats"}).json()["id"]
    for length in (201, 300, 5000):
        boundary = "b" * length
        body = f"--{boundary}\r\nContent-Disposition: form-data; name=\"labels\"\r\n\r\n1\r\n--{boundary}--\r\n"
        response = api_client.post(f"/v1/datasets/{dataset_id}/embeddings", content=body.encode(),
                                   headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert response.status_code == 400 and "boundary" in response.json()["detail"], response.text
    spools = Path(api_client.app.state.ctx.settings.tmp_dir)
    assert [p.name for p in spools.glob("upload-*")] == []


def test_full_disk_while_spooling_is_507(api_client, monkeypatch):
    """The spool file is /dev/full: the kernel answers every write with ENOSPC, as on a full
    data dir (a real full file system cannot be made here without privileges)."""
    dataset_id = api_client.post("/v1/datasets", json={"name": "x", "encoder": "feats"}).json()["id"]
    real_open = builtins.open
    monkeypatch.setattr(multipart, "open", lambda path, mode="r": real_open("/dev/full", mode), raising=False)
    features, labels = blobs(2000, dim=64)  # 512 KB: more than one write buffer
    response = api_client.post(f"/v1/datasets/{dataset_id}/embeddings",
                               files={"embeddings": ("e.npy", npy(features)), "labels": ("l", "\n".join(map(str, labels)))})
    assert response.status_code == 507, response.text
    assert "full" in response.json()["detail"]
    monkeypatch.undo()
    spools = Path(api_client.app.state.ctx.settings.tmp_dir)
    assert [p.name for p in spools.glob("upload-*")] == []
    assert api_client.get(f"/v1/datasets/{dataset_id}").json()["num_items"] == 0


