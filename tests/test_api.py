"""The REST service in-process (FastAPI's TestClient, the in-process worker), on SQLite and
PostgreSQL. The data-dir confinement test runs a real uvicorn process: what a process writes to
its system temp dir is the point there."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from apiserver import database_for, running_server, wait_for_job
from conftest import blobs, make_settings, npy
from fastapi.testclient import TestClient

from service.api.app import create_app

KEYS = {"alice": "alice-secret-key", "bob": "bob-secret-key-01"}
SCORE_FIELDS = {"sample_id", "label", "rmd", "md_class", "md_agnostic", "rmd_min", "predicted_label"}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp(f"api-{request.param}") / "data"
    with database_for(request.param) as db_url:
        settings = make_settings(data_dir, api_keys={key: tenant for tenant, key in KEYS.items()})
        if db_url is not None:
            settings = make_settings(data_dir, database_url=db_url, api_keys=settings.api_keys)
        app = create_app(settings)
        with TestClient(app):  # runs the lifespan (database, in-process worker) once per module
            yield app, data_dir


def client(app, tenant: str | None = "alice") -> contextlib.AbstractContextManager[httpx.Client]:
    """A client of the running app for one tenant (its own context would run the lifespan again)."""
    headers = {"Authorization": f"Bearer {KEYS[tenant]}"} if tenant else {}
    return contextlib.nullcontext(TestClient(app, headers=headers))


def upload_embeddings(c: httpx.Client, dataset_id: str, features, labels, ids=None) -> httpx.Response:
    files = {
        "embeddings": ("e.npy", npy(features)),
        "labels": ("labels.txt", "\n".join(str(x) for x in labels)),
    }
    if ids is not None:
        files["ids"] = ("ids.txt", "\n".join(ids))
    return c.post(f"/v1/datasets/{dataset_id}/embeddings", files=files)


def fitted_dataset(c: httpx.Client, n: int = 300, seed: int = 0, **fit_options) -> tuple[str, str]:
    dataset_id = c.post("/v1/datasets", json={"name": "blobs", "encoder": "my-features"}).json()["id"]
    features, labels = blobs(n, seed=seed)
    assert upload_embeddings(c, dataset_id, features, labels).status_code == 201
    job = wait_for_job(c, c.post(f"/v1/datasets/{dataset_id}/fit", json=fit_options).json()["job_id"])
    assert job["state"] == "succeeded", job
    return dataset_id, job["result"]["fit_id"]


def test_health_ready_and_metrics(server):
    app, _ = server
    with client(app, None) as c:
        assert c.get("/healthz").json()["status"] == "ok"
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "data_dir": "ok"}
    with client(app) as c:
        fitted_dataset(c, n=60)
        text = c.get("/metrics").text
    for name in ("difficulty_http_requests_total", "difficulty_http_request_seconds_bucket",
                 'difficulty_jobs{state="succeeded"}', "difficulty_items_embedded"):
        assert name in text


def test_missing_or_unknown_key_is_401(server):
    app, _ = server
    with client(app, None) as c:
        response = c.get("/v1/datasets")
        assert response.status_code == 401 and "detail" in response.json()
        assert c.get("/v1/datasets", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert c.get("/v1/datasets", headers={"Authorization": "Basic abc"}).status_code == 401


def test_embeddings_dataset_end_to_end(server):
    app, data_dir = server
    with client(app) as c:
        created = c.post("/v1/datasets", json={"name": "blobs"})
        assert created.status_code == 201
        dataset_id = created.json()["id"]
        got = c.get(f"/v1/datasets/{dataset_id}").json()
        assert got["fit"] is None and got["num_items"] == 0 and got["classes"] == []

        features, labels = blobs(400)
        ids = [f"s{i:04d}" for i in range(400)]
        uploaded = upload_embeddings(c, dataset_id, features, labels, ids)
        assert uploaded.status_code == 201, uploaded.text
        assert uploaded.json()["num_items"] == 400 and uploaded.json()["encoder"] == "precomputed"

        early = c.get(f"/v1/datasets/{dataset_id}/scores")
        assert early.status_code == 409 and "not fitted" in early.json()["detail"]
        assert c.get(f"/v1/datasets/{dataset_id}/scores", params={"format": "arrow"}).status_code == 409

        accepted = c.post(f"/v1/datasets/{dataset_id}/fit", json={"normalize": True, "shrinkage": "auto"})
        assert accepted.status_code == 202
        job = wait_for_job(c, accepted.json()["job_id"])
        assert job["state"] == "succeeded", job
        assert job["progress"]["done"] == job["progress"]["total"] == 400
        assert c.get(f"/v1/datasets/{dataset_id}/jobs").json()[0]["id"] == job["id"]

        got = c.get(f"/v1/datasets/{dataset_id}").json()
        assert got["num_items"] == got["num_embedded"] == 400
        assert sorted(x["label"] for x in got["classes"]) == ["0", "1", "2"]
        assert sum(x["count"] for x in got["classes"]) == 400
        fit = got["fit"]
        for key in ("id", "created_at", "normalize", "shrinkage", "shrinkage_agnostic", "encoder", "weights_sha256"):
            assert key in fit
        assert fit["id"] == job["result"]["fit_id"] and fit["normalize"] is True
        assert fit["knn_k"] == 10 and fit["knn_search"] == "exact"

        # Whole table: Arrow stream with the fit id, parquet and csv agree.
        arrow = c.get(f"/v1/datasets/{dataset_id}/scores", params={"format": "arrow"})
        assert arrow.headers["content-type"] == "application/vnd.apache.arrow.stream"
        assert arrow.headers["x-fit-id"] == fit["id"]
        table = pa.ipc.open_stream(arrow.content).read_all()
        assert SCORE_FIELDS | {"knn_agreement"} <= set(table.column_names)
        assert table.num_rows == 400 and sorted(table.column("sample_id").to_pylist()) == ids
        parquet = pq.read_table(io.BytesIO(c.get(f"/v1/datasets/{dataset_id}/scores", params={"format": "parquet"}).content))
        csv = pacsv.read_csv(io.BytesIO(c.get(f"/v1/datasets/{dataset_id}/scores", params={"format": "csv"}).content))
        assert parquet.num_rows == csv.num_rows == 400
        rmd_of = dict(zip(table.column("sample_id").to_pylist(), table.column("rmd").to_pylist(), strict=True))
        agreement = table.column("knn_agreement").to_numpy()
        assert np.all((agreement >= 0) & (agreement <= 1))

        # JSON pages: keyset cursor walks the whole table in (rmd, sample_id) order.
        for order in ("asc", "desc"):
            seen, cursor = [], None
            while True:
                params = {"limit": 37, "order": order} | ({"cursor": cursor} if cursor else {})
                body = c.get(f"/v1/datasets/{dataset_id}/scores", params=params).json()
                seen += body["items"]
                cursor = body["next_cursor"]
                if cursor is None:
                    break
            keys = [(x["rmd"], x["sample_id"]) for x in seen]
            assert keys == sorted(keys, reverse=order == "desc") and len(keys) == 400
            assert set(seen[0]) >= SCORE_FIELDS
            assert all(abs(rmd_of[x["sample_id"]] - x["rmd"]) < 1e-12 for x in seen)
        one_label = c.get(f"/v1/datasets/{dataset_id}/scores", params={"label": "1", "limit": 1000}).json()
        assert {x["label"] for x in one_label["items"]} == {"1"}
        assert len(one_label["items"]) == int((labels == 1).sum())
        assert c.get(f"/v1/datasets/{dataset_id}/scores", params={"label": "nope"}).json()["items"] == []

        summary = c.get(f"/v1/datasets/{dataset_id}/summary").json()
        assert summary["fit_id"] == fit["id"] and [x["label"] for x in summary["classes"]] == ["0", "1", "2"]
        assert all(0 <= x["predicted_differs"] <= 1 and x["rmd_p10"] <= x["rmd_p90"] for x in summary["classes"])

        near = c.get(f"/v1/datasets/{dataset_id}/samples/s0001/neighbors", params={"k": 5}).json()
        assert len(near["neighbors"]) == 5 and near["label"] == str(labels[1])
        assert all(n["sample_id"] != "s0001" and -1.0001 <= n["similarity"] <= 1.0001 for n in near["neighbors"])
        assert c.get(f"/v1/datasets/{dataset_id}/samples/nope/neighbors").status_code == 404

        # New items against the fitted Gaussians: with labels (rmd) and without (rmd_min only).
        new_x, new_y = blobs(5, seed=9)
        with_labels = c.post(
            f"/v1/datasets/{dataset_id}/score",
            files={"embeddings": ("x.npy", npy(new_x)), "labels": ("y.txt", "\n".join(map(str, new_y)))},
        ).json()
        assert with_labels["fit_id"] == fit["id"] and all(i["rmd"] is not None for i in with_labels["items"])
        without = c.post(f"/v1/datasets/{dataset_id}/score", files={"embeddings": ("x.npy", npy(new_x))}).json()
        assert all(i["rmd"] is None and i["predicted_label"] in {"0", "1", "2"} for i in without["items"])
        assert c.get(f"/v1/datasets/{dataset_id}/failures").json()["count"] == 0

        # Append and refit: old chunks are reused (not rewritten), the fit id changes.
        store = data_dir / "datasets" / dataset_id / "embeddings"
        before = {p.name: p.stat().st_mtime_ns for p in store.glob("chunk-*.npz")}
        more_x, more_y = blobs(100, seed=1)
        more_ids = [f"t{i:04d}" for i in range(100)]
        assert upload_embeddings(c, dataset_id, more_x, more_y, more_ids).status_code == 201
        assert upload_embeddings(c, dataset_id, more_x, more_y, more_ids).status_code == 409  # duplicate IDs
        job2 = wait_for_job(c, c.post(f"/v1/datasets/{dataset_id}/fit").json()["job_id"])
        assert job2["state"] == "succeeded", job2
        after = {p.name: p.stat().st_mtime_ns for p in store.glob("chunk-*.npz")}
        assert all(after[name] == stamp for name, stamp in before.items()) and len(after) > len(before)
        refit = c.get(f"/v1/datasets/{dataset_id}").json()
        assert refit["fit"]["id"] != fit["id"] and refit["num_embedded"] == 500
        assert any(p.name.startswith("stats-") for p in store.iterdir())

        listed = c.get("/v1/datasets").json()["items"]
        assert dataset_id in [d["id"] for d in listed]
        assert c.delete(f"/v1/datasets/{dataset_id}").status_code == 204
        assert c.get(f"/v1/datasets/{dataset_id}").status_code == 404
        assert not (data_dir / "datasets" / dataset_id).exists()


def test_tenants_see_only_their_datasets(server):
    app, _ = server
    with client(app, "alice") as alice, client(app, "bob") as bob:
        dataset_id, _ = fitted_dataset(alice, n=60)
        job_id = alice.get(f"/v1/datasets/{dataset_id}/jobs").json()[0]["id"]
        assert dataset_id not in [d["id"] for d in bob.get("/v1/datasets").json()["items"]]
        features, labels = blobs(10)
        for response in (
            bob.get(f"/v1/datasets/{dataset_id}"),
            bob.get(f"/v1/datasets/{dataset_id}/scores"),
            bob.get(f"/v1/datasets/{dataset_id}/scores", params={"format": "arrow"}),
            bob.get(f"/v1/datasets/{dataset_id}/summary"),
            bob.get(f"/v1/datasets/{dataset_id}/jobs"),
            bob.get(f"/v1/datasets/{dataset_id}/failures"),
            bob.get(f"/v1/datasets/{dataset_id}/samples/0/neighbors"),
            bob.post(f"/v1/datasets/{dataset_id}/fit"),
            upload_embeddings(bob, dataset_id, features, labels),
            bob.post(f"/v1/datasets/{dataset_id}/score", files={"embeddings": ("x.npy", npy(features))}),
            bob.get(f"/v1/jobs/{job_id}"),
            bob.post(f"/v1/jobs/{job_id}/cancel"),
            bob.delete(f"/v1/datasets/{dataset_id}"),
        ):
            assert response.status_code == 404, (response.request.url, response.text)
            assert "detail" in response.json()
        assert alice.get(f"/v1/datasets/{dataset_id}").status_code == 200


def test_bad_input_gets_4xx_with_detail(server):
    app, _ = server
    with client(app) as c:
        assert c.post("/v1/datasets", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
        assert c.post("/v1/datasets", json={"name": ""}).status_code == 422
        assert c.post("/v1/datasets", json={"name": "x", "encoder": "open_clip:ViT-B-16"}).status_code == 422
        assert c.post("/v1/datasets", json={"name": "x", "encoder": "has space"}).status_code == 422
        assert c.get("/v1/datasets/does-not-exist").status_code == 404
        assert c.get("/v1/jobs/does-not-exist").status_code == 404
        dataset_id = c.post("/v1/datasets", json={"name": "bad", "encoder": "feats"}).json()["id"]
        assert c.post(f"/v1/datasets/{dataset_id}/fit").status_code == 409  # no items yet
        features, labels = blobs(20)
        nan = features.copy()
        nan[3, 1] = np.nan
        cases = [
            upload_embeddings(c, dataset_id, nan, labels),
            upload_embeddings(c, dataset_id, features, labels[:-1]),
            upload_embeddings(c, dataset_id, features[:, :0].reshape(20, 0), labels),
            c.post(f"/v1/datasets/{dataset_id}/embeddings", files={"embeddings": ("e.npy", b"garbage"), "labels": ("l", b"1")}),
            c.post(f"/v1/datasets/{dataset_id}/embeddings", files={"embeddings": ("e.npy", npy(features))}),
            c.post(f"/v1/datasets/{dataset_id}/embeddings", files={"labels": ("l", b"1")}),
        ]
        for response in cases:
            assert response.status_code == 422, response.text
            assert "detail" in response.json()
        assert c.post(f"/v1/datasets/{dataset_id}/embeddings", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
        assert c.post(f"/v1/datasets/{dataset_id}/embeddings", content=b"--zz\r\ngarbage",
                      headers={"content-type": "multipart/form-data; boundary=zz"}).status_code in (400, 422)
        assert upload_embeddings(c, dataset_id, features, labels, [f"d{i % 10}" for i in range(20)]).status_code == 422
        assert upload_embeddings(c, dataset_id, features, labels).status_code == 201
        assert upload_embeddings(c, dataset_id, features[:, :4], labels, [f"z{i}" for i in range(20)]).status_code == 422
        assert c.post(f"/v1/datasets/{dataset_id}/fit", json={"shrinkage": 2}).status_code == 422
        assert c.post(f"/v1/datasets/{dataset_id}/fit", json={"shrinkage": "sometimes"}).status_code == 422
        assert c.post(f"/v1/datasets/{dataset_id}/fit", json={"bogus": 1}).status_code == 422
        assert c.post(f"/v1/datasets/{dataset_id}/score", files={"embeddings": ("x.npy", npy(features))}).status_code == 409

        job = wait_for_job(c, c.post(f"/v1/datasets/{dataset_id}/fit", json={"shrinkage": 0.1}).json()["job_id"])
        assert job["state"] == "succeeded", job
        for params in ({"cursor": "garbage"}, {"cursor": "eyJ4IjoxfQ"}, {"limit": 0}, {"limit": 10**6},
                       {"order": "sideways"}, {"format": "xml"}):
            response = c.get(f"/v1/datasets/{dataset_id}/scores", params=params)
            assert response.status_code in (400, 422), (params, response.text)
        wrong_dim = c.post(f"/v1/datasets/{dataset_id}/score", files={"embeddings": ("x.npy", npy(features[:, :3]))})
        assert wrong_dim.status_code == 422
        unknown_label = c.post(f"/v1/datasets/{dataset_id}/score",
                               files={"embeddings": ("x.npy", npy(features[:2])), "labels": ("y", b"0\n7")})
        assert unknown_label.status_code == 422 and "7" in unknown_label.json()["detail"]
        assert c.post(f"/v1/datasets/{dataset_id}/score", files={"other": ("x", b"1")}).status_code == 422


def test_failed_fit_says_what_to_do(server):
    app, _ = server
    with client(app) as c:
        dataset_id = c.post("/v1/datasets", json={"name": "tiny", "encoder": "feats"}).json()["id"]
        features, labels = blobs(1)
        assert upload_embeddings(c, dataset_id, features, labels).status_code == 201
        job = wait_for_job(c, c.post(f"/v1/datasets/{dataset_id}/fit").json()["job_id"])
        assert job["state"] == "failed"
        assert "at least 2" in job["error"]
        assert c.get(f"/v1/datasets/{dataset_id}").json()["fit"] is None
        assert c.post(f"/v1/jobs/{job['id']}/cancel").status_code == 409


def test_data_dir_only(tmp_path):
    """Nothing the service writes lands outside its data dir, spooled uploads included: a
    multipart parser that spools large parts to the system temp dir would write there."""
    data_dir = tmp_path / "data"
    system_tmp = tmp_path / "system-tmp"  # the server process's TMPDIR, watched
    system_tmp.mkdir()
    features, labels = blobs(4000, dim=128)  # 2 MB: above the usual 1 MiB in-memory spool limit
    with running_server(data_dir, api_keys=KEYS, env={"TMPDIR": str(system_tmp)}) as url, httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {KEYS['alice']}"}, timeout=60
    ) as c:
        dataset_id = c.post("/v1/datasets", json={"name": "big", "encoder": "feats"}).json()["id"]
        assert upload_embeddings(c, dataset_id, features, labels).status_code == 201
    assert list(system_tmp.iterdir()) == []
    assert list((Path(data_dir) / "tmp").glob("upload-*")) == []  # spools are removed afterwards
    outside = sorted(p.name for p in Path(data_dir).parent.iterdir())
    assert all(name in ("data", "system-tmp") or name.endswith(".log") for name in outside), outside
