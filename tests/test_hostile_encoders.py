"""Hostile encoder names: a tenant may not build arbitrary models, trigger downloads or make
the server load a file (``open_clip:ViT-B-16:/proc/self/environ`` was accepted with 201), and
the embeddings upload's ``encoder`` field may not impersonate an image encoder. Unknown image
encoders are a 4xx at dataset creation; refusals do not depend on whether a path exists.

Cost: in-process apps (~1 s each, two), no model is loaded.
"""

from __future__ import annotations

import io

import numpy as np
from conftest import blobs, make_settings
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.encoders.names import DEFAULT_ALLOWED_ENCODERS


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_tenants_name_only_allow_listed_image_encoders(api_client, tmp_path):
    c = api_client
    existing = tmp_path / "weights.bin"
    existing.write_bytes(b"x")
    refused = [
        "open_clip:ViT-B-16:/proc/self/environ",
        f"open_clip:ViT-B-16:{existing}",  # exists
        f"open_clip:ViT-B-16:{tmp_path / 'missing.bin'}",  # does not: same answer
        "open_clip:ViT-B-16:../../etc/passwd",
        "open_clip:ViT-H-14:laion2b_s32b_b79k",  # a real tag, not allow-listed (a 4 GB download)
        "open_clip:NoSuchModel:openai",
        "efficientnet-lite1",  # a typo must not become a label for precomputed features
        "open_clip:ViT-B-16:" + "x" * 900,
    ]
    details = []
    for name in refused:
        response = c.post("/v1/datasets", json={"name": "x", "encoder": name})
        assert response.status_code == 422, (name[:80], response.text)
        detail = str(response.json()["detail"])  # a string, or the validation list for > 200 chars
        assert len(detail) < 1000, "the message echoes a bounded prefix of the name"
        details.append(detail.replace(str(existing), "P").replace(str(tmp_path / "missing.bin"), "P"))
    assert details[1] == details[2], "the answer must not reveal whether a server file exists"
    assert "DIFFICULTY_ALLOWED_ENCODERS" in details[0]
    assert c.get("/v1/datasets").json()["items"] == []
    for name in DEFAULT_ALLOWED_ENCODERS + ("my-features",):
        assert c.post("/v1/datasets", json={"name": "ok", "encoder": name}).status_code == 201, name


def test_embeddings_upload_cannot_impersonate_an_image_encoder(api_client):
    c = api_client
    features, labels = blobs(30)
    for name in ("open_clip:ViT-B-16:/etc/passwd", "open_clip:ViT-B-16:openai", "efficientnet-lite0", "EfficientNet-B7"):
        dataset_id = c.post("/v1/datasets", json={"name": "x", "encoder": "feats"}).json()["id"]
        response = c.post(f"/v1/datasets/{dataset_id}/embeddings", data={"encoder": name},
                          files={"embeddings": ("e.npy", npy(features)), "labels": ("l", "\n".join(map(str, labels)))})
        assert response.status_code == 422 and "image encoder" in response.json()["detail"], (name, response.text)
        assert c.get(f"/v1/datasets/{dataset_id}").json()["encoder"] == "feats"
    dataset_id = c.post("/v1/datasets", json={"name": "x"}).json()["id"]  # default image encoder
    response = c.post(f"/v1/datasets/{dataset_id}/embeddings", data={"encoder": "clip-b16-features"},
                      files={"embeddings": ("e.npy", npy(features)), "labels": ("l", "\n".join(map(str, labels)))})
    assert response.status_code == 201 and response.json()["encoder"] == "clip-b16-features"


def test_operator_allow_list_is_the_policy_and_is_checked_before_a_fit(tmp_path):
    data_dir = tmp_path / "data"
    checkpoint = "open_clip:ViT-B-16:/weights/ViT-B-16.bin"
    with TestClient(create_app(make_settings(data_dir, allowed_encoders=(checkpoint,)), run_worker=False)) as c:
        # The operator listed this path: allowed. The default encoder is always allowed.
        listed = c.post("/v1/datasets", json={"name": "a", "encoder": checkpoint})
        assert listed.status_code == 201, listed.text
        assert c.post("/v1/datasets", json={"name": "b"}).status_code == 201
        assert c.post("/v1/datasets", json={"name": "c", "encoder": "efficientnet-lite0"}).status_code == 422
        dataset_id = listed.json()["id"]
        archive = io.BytesIO()
        import zipfile

        with zipfile.ZipFile(archive, "w") as z:
            z.writestr("cat/1.jpg", b"x")
            z.writestr("dog/2.jpg", b"y")
        assert c.post(f"/v1/datasets/{dataset_id}/items", files={"file": ("a.zip", archive.getvalue())}).status_code == 201
    # The operator removes it: the fit is refused before it is queued (no job loads the file).
    with TestClient(create_app(make_settings(data_dir), run_worker=False)) as c:
        response = c.post(f"/v1/datasets/{dataset_id}/fit")
        assert response.status_code == 422 and "DIFFICULTY_ALLOWED_ENCODERS" in response.json()["detail"], response.text
        assert c.get(f"/v1/datasets/{dataset_id}/jobs").json() == []
