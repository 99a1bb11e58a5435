"""Deleting a dataset while its upload is being stored: before, the upload recreated the
dataset's folder and answered 500 (a foreign-key or stale-row error). Now the upload is a 404
and nothing is left on disk, whichever side wins.

The interleaving is forced: the delete runs (through its use case, as the DELETE route would)
right after the upload has checked the dataset and written its files, before its commit.
Cost: in-process app, ~1 s; the PostgreSQL variant ~2 s (skipped without it unless CI).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from apiserver import database_for
from conftest import blobs, make_settings
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.settings import ANONYMOUS_TENANT
from service.storage import layout
from service.storage.uploads import UploadFiles
from service.usecases import datasets


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_delete_during_upload_leaves_nothing(tmp_path, monkeypatch, kind):
    with database_for(kind) as db_url:
        settings = make_settings(tmp_path / "data", **({"database_url": db_url} if db_url else {}))
        with TestClient(create_app(settings, run_worker=False)) as c:
            ctx = c.app.state.ctx
            dataset_id = c.post("/v1/datasets", json={"name": "x", "encoder": "feats"}).json()["id"]
            real_put = UploadFiles.put_embeddings

            def put_then_delete(self, *args, **kwargs):  # type: ignore[no-untyped-def]
                real_put(self, *args, **kwargs)
                datasets.delete_dataset(ctx, ANONYMOUS_TENANT, dataset_id)  # the concurrent DELETE

            monkeypatch.setattr(UploadFiles, "put_embeddings", put_then_delete)
            features, labels = blobs(40)
            buffer = io.BytesIO()
            np.save(buffer, features)
            response = c.post(f"/v1/datasets/{dataset_id}/embeddings",
                              files={"embeddings": ("e.npy", buffer.getvalue()),
                                     "labels": ("l", "\n".join(map(str, labels)))})
            assert response.status_code == 404, response.text
            assert not layout.dataset_dir(settings.data_dir, dataset_id).exists()
            assert list(settings.tmp_dir.glob("upload-*")) == []
            assert c.get("/v1/datasets").json()["items"] == []
