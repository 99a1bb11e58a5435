"""openapi.json at the repository root is exactly what the app serves."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
from apiserver import running_server

ROOT = Path(__file__).resolve().parents[1]


def test_checked_in_openapi_matches_the_running_app(tmp_path):
    checked_in = json.loads((ROOT / "openapi.json").read_text())
    with running_server(tmp_path / "data", with_worker=False) as url:
        served = httpx.get(url + "/openapi.json", timeout=30).json()
    assert served == checked_in, "openapi.json is stale: run .venv/bin/python scripts/write_openapi.py"


def test_write_openapi_check_mode_agrees():
    result = subprocess.run([sys.executable, "scripts/write_openapi.py", "--check"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_spec_routes_and_fields_are_documented():
    spec = json.loads((ROOT / "openapi.json").read_text())
    paths = spec["paths"]
    for path, method in [
        ("/v1/datasets", "post"), ("/v1/datasets", "get"), ("/v1/datasets/{dataset_id}", "get"),
        ("/v1/datasets/{dataset_id}", "delete"), ("/v1/datasets/{dataset_id}/items", "post"),
        ("/v1/datasets/{dataset_id}/embeddings", "post"), ("/v1/datasets/{dataset_id}/fit", "post"),
        ("/v1/jobs/{job_id}", "get"), ("/v1/jobs/{job_id}/cancel", "post"),
        ("/v1/datasets/{dataset_id}/scores", "get"), ("/v1/datasets/{dataset_id}/score", "post"),
        ("/v1/datasets/{dataset_id}/summary", "get"),
        ("/v1/datasets/{dataset_id}/samples/{sample_id}/neighbors", "get"),
        ("/healthz", "get"), ("/readyz", "get"), ("/metrics", "get"),
    ]:
        assert method in paths[path], (path, method)
    item = spec["components"]["schemas"]["ScoreItem"]["properties"]
    assert {"sample_id", "label", "rmd", "md_class", "md_agnostic", "rmd_min", "predicted_label"} <= set(item)
    params = {p["name"] for p in paths["/v1/datasets/{dataset_id}/scores"]["get"]["parameters"]}
    assert {"limit", "cursor", "order", "label", "format"} <= params
