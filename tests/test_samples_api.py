"""The dashboard's API routes through the in-process app: one sample's evidence, thumbnails
made while embedding, the 2-D map and the embeddings export; tenant checks and bad input.

Cost: about 15 s (one tiny-encoder image fit and one uploaded-embeddings fit, shared by the
module)."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import make_settings, wait_for_job
from imagedata import TINY_CLIP, save_tiny_clip_checkpoint, write_image_folder, zip_folder
from PIL import Image

from service.storage.thumbnails import ThumbnailStore

KEYS = {"alice": "key-alice-0123456789", "bob": "key-bob-0123456789ab"}
ALICE = {"Authorization": f"Bearer {KEYS['alice']}"}
BOB = {"Authorization": f"Bearer {KEYS['bob']}"}


def _fit(client, dataset_id: str, headers: dict) -> dict:  # type: ignore[no-untyped-def]
    job = client.post(f"/v1/datasets/{dataset_id}/fit", json={"shrinkage": 0.1}, headers=headers)
    assert job.status_code == 202, job.text
    state = wait_for_job_with(client, job.json()["job_id"], headers)
    assert state["state"] == "succeeded", state
    return state


def wait_for_job_with(client, job_id: str, headers: dict) -> dict:  # type: ignore[no-untyped-def]
    class Authorised:
        def get(self, url: str):  # type: ignore[no-untyped-def]
            return client.get(url, headers=headers)

    return wait_for_job(Authorised(), job_id)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    from fastapi.testclient import TestClient

    from service.api.app import create_app

    root = tmp_path_factory.mktemp("samples")
    checkpoint = save_tiny_clip_checkpoint(root / "tiny")
    images = root / "images"
    write_image_folder(images, per_class=8, size=48)
    (images / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    encoder = f"open_clip:{TINY_CLIP}:{checkpoint}"
    settings = make_settings(
        root / "data", api_keys={key: tenant for tenant, key in KEYS.items()}, allowed_encoders=(encoder,)
    )
    with TestClient(create_app(settings)) as client:
        image_ds = client.post("/v1/datasets", json={"name": "img", "encoder": encoder}, headers=ALICE).json()["id"]
        up = client.post(f"/v1/datasets/{image_ds}/items", files={"file": ("i.zip", zip_folder(images))}, headers=ALICE)
        assert up.status_code == 201, up.text
        _fit(client, image_ds, ALICE)
        rng = np.random.default_rng(0)
        features = np.concatenate([rng.normal(c, 1.0, size=(40, 6)) for c in range(3)]).astype(np.float32)
        labels = "\n".join(str(c) for c in np.repeat(np.arange(3), 40)).encode()
        buffer = io.BytesIO()
        np.save(buffer, features)
        emb_ds = client.post("/v1/datasets", json={"name": "emb"}, headers=ALICE).json()["id"]
        up = client.post(
            f"/v1/datasets/{emb_ds}/embeddings",
            files={"embeddings": ("e.npy", buffer.getvalue()), "labels": ("l.txt", labels)},
            headers=ALICE,
        )
        assert up.status_code == 201, up.text
        _fit(client, emb_ds, ALICE)
        yield {"client": client, "image": image_ds, "embeddings": emb_ds, "features": features,
               "data_dir": settings.data_dir}


def _scores(client, dataset_id: str) -> pa.Table:  # type: ignore[no-untyped-def]
    response = client.get(f"/v1/datasets/{dataset_id}/scores", params={"format": "arrow"}, headers=ALICE)
    return pa.ipc.open_stream(response.content).read_all()


def test_every_scored_image_has_a_thumbnail_with_caching_headers(app: dict) -> None:
    client, ds = app["client"], app["image"]
    table = _scores(client, ds)
    assert table.num_rows == 24  # 3 classes x 8; the broken file is a failure, not a sample
    for sample_id in table.column("sample_id").to_pylist():
        response = client.get(f"/v1/datasets/{ds}/samples/{sample_id}/thumbnail", headers=ALICE)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/jpeg"
        image = Image.open(io.BytesIO(response.content))
        assert image.format == "JPEG" and image.size == (48, 48)  # small images are not upscaled
    tag = response.headers["etag"]
    assert "max-age" in response.headers["cache-control"]
    again = client.get(f"/v1/datasets/{ds}/samples/{sample_id}/thumbnail", headers={**ALICE, "If-None-Match": tag})
    assert again.status_code == 304 and again.content == b""


def test_thumbnails_refused_clearly(app: dict) -> None:
    client, ds, emb = app["client"], app["image"], app["embeddings"]
    sample_id = _scores(client, ds).column("sample_id")[0].as_py()
    other = client.get(f"/v1/datasets/{ds}/samples/{sample_id}/thumbnail", headers=BOB)
    assert other.status_code == 404 and "dataset" in other.json()["detail"]
    unknown = client.get(f"/v1/datasets/{ds}/samples/red/nope.jpg/thumbnail", headers=ALICE)
    assert unknown.status_code == 404 and "no thumbnail" in unknown.json()["detail"]
    broken = client.get(f"/v1/datasets/{ds}/samples/red/broken.jpg/thumbnail", headers=ALICE)
    assert broken.status_code == 404
    uploaded = client.get(f"/v1/datasets/{emb}/samples/0/thumbnail", headers=ALICE)
    assert uploaded.status_code == 404 and "uploaded as embeddings" in uploaded.json()["detail"]
    assert client.get(f"/v1/datasets/{ds}/samples/{sample_id}/thumbnail").status_code == 401


def test_sample_detail_is_the_evidence_behind_its_score(app: dict) -> None:
    client, ds = app["client"], app["image"]
    table = _scores(client, ds).sort_by([("rmd", "descending")])
    hardest = table.slice(0, 1).to_pylist()[0]
    response = client.get(f"/v1/datasets/{ds}/samples/{hardest['sample_id']}", params={"k": 5}, headers=ALICE)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["label"] == hardest["label"] and body["predicted_label"] == hardest["predicted_label"]
    assert body["scores"] == hardest  # every column of the score table, knn_agreement included
    assert "knn_agreement" in body["scores"] and body["has_thumbnail"] is True
    distances = {d["label"]: d["rmd"] for d in body["class_distances"]}
    assert set(distances) == {"blue", "green", "red"}
    # On demand from the model: the own-class distance is the stored rmd, the nearest class is
    # the predicted label, and rmd_min is the smallest of them.
    assert distances[hardest["label"]] == pytest.approx(hardest["rmd"], rel=1e-9, abs=1e-9)
    assert body["class_distances"][0]["label"] == hardest["predicted_label"]
    assert body["class_distances"][0]["rmd"] == pytest.approx(hardest["rmd_min"], rel=1e-9, abs=1e-9)
    assert len(body["neighbors"]) == 5
    by_id = {row["sample_id"]: row for row in table.to_pylist()}
    similarities = [n["similarity"] for n in body["neighbors"]]
    assert similarities == sorted(similarities, reverse=True)
    for neighbor in body["neighbors"]:
        assert neighbor["sample_id"] != hardest["sample_id"]
        assert neighbor["scores"] == by_id[neighbor["sample_id"]]
        assert neighbor["label"] == by_id[neighbor["sample_id"]]["label"]


def test_sample_detail_refuses_bad_input(app: dict) -> None:
    client, ds = app["client"], app["image"]
    sample_id = _scores(client, ds).column("sample_id")[0].as_py()
    assert client.get(f"/v1/datasets/{ds}/samples/{sample_id}", headers=BOB).status_code == 404
    unknown = client.get(f"/v1/datasets/{ds}/samples/no/such.png", headers=ALICE)
    assert unknown.status_code == 404 and "not in this dataset" in unknown.json()["detail"]
    assert client.get(f"/v1/datasets/{ds}/samples/{sample_id}", params={"k": 100000}, headers=ALICE).status_code == 422
    unfitted = client.post("/v1/datasets", json={"name": "empty"}, headers=ALICE).json()["id"]
    assert client.get(f"/v1/datasets/{unfitted}/samples/x", headers=ALICE).status_code == 409
    assert client.get(f"/v1/datasets/{unfitted}/map", headers=ALICE).status_code == 409
    assert client.get(f"/v1/datasets/{unfitted}/embeddings", headers=ALICE).status_code == 409


def _unpack_map(body: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    length = int(np.frombuffer(body[:4], "<u4")[0])
    header = json.loads(body[4 : 4 + length])
    n = header["count"]
    arrays = np.frombuffer(body[4 + length :], "<u2").reshape(len(header["arrays"]), n)
    return header, dict(zip(header["arrays"], arrays, strict=True))


def test_map_is_pca_of_the_features_in_score_order(app: dict) -> None:
    client, emb = app["client"], app["embeddings"]
    response = client.get(f"/v1/datasets/{emb}/map", headers=ALICE)
    assert response.status_code == 200
    header, arrays = _unpack_map(response.content)
    assert header["count"] == 120 and len(response.content) < 4 + 512 + 120 * 2 * len(header["arrays"])
    assert client.get(f"/v1/datasets/{emb}/map", headers={**ALICE, "If-None-Match": response.headers["etag"]}).status_code == 304
    table = _scores(client, emb).sort_by([("rmd", "ascending"), ("sample_id", "ascending")])
    labels = np.asarray(header["labels"])
    assert labels[arrays["label"]].tolist() == table.column("label").to_pylist()
    assert labels[arrays["predicted_label"]].tolist() == table.column("predicted_label").to_pylist()
    if "is_label_issue" in table.column_names:
        assert arrays["is_label_issue"].astype(bool).tolist() == table.column("is_label_issue").to_pylist()
    lo, hi = header["rmd"]
    rmd = lo + arrays["rmd"] / 65535 * (hi - lo)
    np.testing.assert_allclose(rmd, table.column("rmd").to_numpy(), atol=(hi - lo) / 65535)
    # Independent PCA of the L2-normalised features (the fit's default space), matched by ID.
    x = app["features"].astype(np.float64)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    expected = centred @ vt[:2].T
    order = [int(s) for s in table.column("sample_id").to_pylist()]
    for axis, name in enumerate(("x", "y")):
        lo, hi = header[name]
        got = lo + arrays[name] / 65535 * (hi - lo)
        correlation = np.corrcoef(got, expected[order, axis])[0, 1]
        assert abs(correlation) > 0.999
    rows = client.get(f"/v1/datasets/{emb}/map/rows", params={"rows": "0,119,5"}, headers=ALICE)
    assert rows.status_code == 200
    ids = [item["sample_id"] for item in rows.json()["items"]]
    assert ids == [table.column("sample_id")[i].as_py() for i in (0, 119, 5)]
    arrow = client.get(f"/v1/datasets/{emb}/map", params={"format": "arrow"}, headers=ALICE)
    with_ids = pa.ipc.open_stream(arrow.content).read_all()
    assert with_ids.column("sample_id").to_pylist() == table.column("sample_id").to_pylist()


def test_map_rows_refuses_bad_input(app: dict) -> None:
    client, emb = app["client"], app["embeddings"]
    too_many = client.get(f"/v1/datasets/{emb}/map/rows", params={"rows": ",".join(["1"] * 1001)}, headers=ALICE)
    assert too_many.status_code == 413 and "at most 1000" in too_many.json()["detail"]
    outside = client.get(f"/v1/datasets/{emb}/map/rows", params={"rows": "120"}, headers=ALICE)
    assert outside.status_code == 422 and "outside the map" in outside.json()["detail"]
    garbage = client.get(f"/v1/datasets/{emb}/map/rows", params={"rows": "1,x"}, headers=ALICE)
    assert garbage.status_code == 422
    assert client.get(f"/v1/datasets/{emb}/map/rows", params={"rows": "1"}, headers=BOB).status_code == 404
    assert client.get(f"/v1/datasets/{emb}/map", headers=BOB).status_code == 404


def test_embeddings_export_in_three_formats(app: dict) -> None:
    client, emb, ds = app["client"], app["embeddings"], app["image"]
    features = app["features"]
    npy = client.get(f"/v1/datasets/{emb}/embeddings", params={"format": "npy"}, headers=ALICE)
    assert npy.status_code == 200
    records = np.load(io.BytesIO(npy.content))
    assert records["sample_id"].tolist() == [str(i) for i in range(120)]
    assert records["label"].tolist() == [str(c) for c in np.repeat(np.arange(3), 40)]
    np.testing.assert_array_equal(records["features"], features)
    arrow = pa.ipc.open_stream(client.get(f"/v1/datasets/{emb}/embeddings", headers=ALICE).content).read_all()
    parquet = pq.read_table(io.BytesIO(client.get(f"/v1/datasets/{emb}/embeddings", params={"format": "parquet"}, headers=ALICE).content))
    for table in (arrow, parquet):
        assert table.column("sample_id").to_pylist() == records["sample_id"].tolist()
        np.testing.assert_array_equal(np.stack(table.column("features").to_numpy(zero_copy_only=False)), features)
    images = pa.ipc.open_stream(client.get(f"/v1/datasets/{ds}/embeddings", headers=ALICE).content).read_all()
    assert images.num_rows == 24 and images.schema.field("features").type.list_size == 32
    assert client.get(f"/v1/datasets/{emb}/embeddings", headers=BOB).status_code == 404
    assert client.get(f"/v1/datasets/{emb}/embeddings", params={"format": "csv"}, headers=ALICE).status_code == 422


def test_thumbnail_file_counts_only_with_its_chunk(tmp_path: Path) -> None:
    store = ThumbnailStore(tmp_path)
    store.write(0, ["a"], [b"\xff\xd8jpeg-a"])
    store.write(1, ["b"], [b"\xff\xd8jpeg-b"])  # a run cut off before chunk 1 was written
    (tmp_path / "chunk-000000.npz").write_bytes(b"")
    assert store.indices() == [0]
    assert store.get("a") == b"\xff\xd8jpeg-a" and store.get("b") is None


def test_leading_eigenvectors_by_lanczos_match_the_dense_decomposition() -> None:
    from service.pipeline.map2d import LANCZOS_MIN_DIM, leading_eigenvectors

    rng = np.random.default_rng(3)
    for d in (5, LANCZOS_MIN_DIM + 60):
        x = rng.normal(size=(400, d)) * np.linspace(3, 0.5, d)
        covariance = np.cov(x.T)
        _, dense = np.linalg.eigh(covariance)
        got = leading_eigenvectors(covariance, 2)
        np.testing.assert_allclose(np.abs(got.T @ dense[:, ::-1][:, :2]), np.eye(2), atol=1e-6)
