"""The error contract: every error a client can get has the shape openapi.json declares for its
status (``{"detail": string | [ValidationError]}``), and no error echoes a hostile input whole
(a 10,000-character encoder name came back in full inside FastAPI's validation list).

Cost: in-process apps (~1 s each, two); no server process.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jsonschema
from conftest import make_settings
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.api.errors import MAX_DETAIL

ROOT = Path(__file__).resolve().parents[1]
SPEC = json.loads((ROOT / "openapi.json").read_text())


def _validator(status: int, path: str, method: str) -> jsonschema.Draft202012Validator:
    response = SPEC["paths"][path][method]["responses"][str(status)]
    schema = response["content"]["application/json"]["schema"]
    return jsonschema.Draft202012Validator({**schema, "components": SPEC["components"]})


def test_every_error_status_declares_the_served_shape():
    for path, operations in SPEC["paths"].items():
        for method, operation in operations.items():
            statuses = set(operation["responses"])
            assert {"413", "421", "422"} <= statuses, (path, method)
            if path.startswith("/v1/"):
                assert "401" in statuses
            for status, response in operation["responses"].items():
                if status[0] in "45" and (path, status) != ("/readyz", "503"):
                    ref = response["content"]["application/json"]["schema"]["$ref"]
                    assert ref == "#/components/schemas/Error", (path, method, status)
    detail = SPEC["components"]["schemas"]["Error"]["properties"]["detail"]["anyOf"]
    assert {d["type"] for d in detail} == {"string", "array"}


def test_served_errors_match_the_document_and_are_bounded(api_client):
    c = api_client
    cases = [
        # (response, status, path template, method)
        (c.post("/v1/datasets", json={"name": "x", "encoder": "x" * 10_000}), 422, "/v1/datasets", "post"),
        (c.post("/v1/datasets", json={"name": "x", "encoder": "open_clip:" + "y" * 900}), 422, "/v1/datasets", "post"),
        (c.post("/v1/datasets", json={"name": ["z" * 5000] * 10}), 422, "/v1/datasets", "post"),
        (c.post("/v1/datasets", json=[{"name": "q" * 10}] * 2000), 422, "/v1/datasets", "post"),
        (c.post("/v1/datasets", content=b"{broken", headers={"content-type": "application/json"}), 422,
         "/v1/datasets", "post"),
        (c.post("/v1/datasets", content=b" " * 70_000, headers={"content-type": "application/json"}), 413,
         "/v1/datasets", "post"),
        (c.get("/v1/datasets/" + "n" * 5000), 404, "/v1/datasets/{dataset_id}", "get"),
        (c.post("/v1/datasets/nope/fit", json={"shrinkage": "sometimes" * 1000}), 422,
         "/v1/datasets/{dataset_id}/fit", "post"),
        (c.post("/v1/datasets/nope/embeddings", content=b"x", headers={"content-type": "text/plain"}), 404,
         "/v1/datasets/{dataset_id}/embeddings", "post"),
    ]
    dataset_id = c.post("/v1/datasets", json={"name": "x", "encoder": "feats"}).json()["id"]
    cases += [
        (c.post(f"/v1/datasets/{dataset_id}/embeddings", content=b"x", headers={"content-type": "text/plain"}), 415,
         "/v1/datasets/{dataset_id}/embeddings", "post"),
        (c.post(f"/v1/datasets/{dataset_id}/fit"), 409, "/v1/datasets/{dataset_id}/fit", "post"),
    ]
    for response, status, path, method in cases:
        assert response.status_code == status, (path, response.text[:300])
        body = response.json()
        _validator(status, path, method).validate(body)
        assert len(response.content) < 3 * MAX_DETAIL + 4000, (path, len(response.content))
        assert "x" * 300 not in response.text and "z" * 300 not in response.text


def test_unauthorised_answers_match_the_document(tmp_path, caplog):
    settings = make_settings(tmp_path / "data", api_keys={"secret-key-0123456789": "t"})
    caplog.set_level(logging.WARNING, logger="service.auth")
    with TestClient(create_app(settings, run_worker=False)) as c:
        for response, path, method in [
            (c.get("/v1/datasets"), "/v1/datasets", "get"),
            (c.post("/v1/datasets", json={"name": "x"}, headers={"Authorization": "Bearer wrong"}), "/v1/datasets", "post"),
            (c.get("/v1/jobs/j", headers={"Authorization": "Basic abc"}), "/v1/jobs/{job_id}", "get"),
        ]:
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == "Bearer"
            _validator(401, path, method).validate(response.json())
    failed = [r.getMessage() for r in caplog.records if r.name == "service.auth"]
    assert len(failed) == 3 and all(m.startswith("authentication failed from ") for m in failed), failed
    assert not any("wrong" in m for m in failed), "the key sent is never logged"
