"""Schemathesis against the live server (real HTTP): no input it generates may cause a 5xx, and
every answer has a documented status, content type and shape (a generated client can parse
every error). Cost: ~90 s (the run is capped at 75 s)."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
from apiserver import running_server, wait_for_job

KEYS = {"fuzz": "fuzz-key-0123456789"}


def test_no_server_errors_under_schemathesis(tmp_path):
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent)) or shutil.which("schemathesis")
    assert cli, "schemathesis is a dev dependency (pip install -e '.[dev]')"
    with running_server(tmp_path / "data", api_keys=KEYS) as url:
        headers = {"Authorization": f"Bearer {KEYS['fuzz']}"}
        # A fitted dataset, so generated requests also reach the fitted code paths of real IDs.
        with httpx.Client(base_url=url, headers=headers, timeout=60) as c:
            dataset_id = c.post("/v1/datasets", json={"name": "fuzz", "encoder": "feats"}).json()["id"]
            rng = np.random.default_rng(0)
            buffer = io.BytesIO()
            np.save(buffer, rng.normal(size=(60, 4)).astype(np.float32))
            c.post(f"/v1/datasets/{dataset_id}/embeddings",
                   files={"embeddings": ("e.npy", buffer.getvalue()), "labels": ("l", "\n".join("ab"[i % 2] for i in range(60)))})
            assert wait_for_job(c, c.post(f"/v1/datasets/{dataset_id}/fit").json()["job_id"])["state"] == "succeeded"
        result = subprocess.run(
            [cli, "run", f"{url}/openapi.json",
             "--checks", "not_a_server_error,response_schema_conformance,status_code_conformance,content_type_conformance",
             "--header", f"Authorization: Bearer {KEYS['fuzz']}",
             "--max-examples", "15", "--phases", "examples,coverage,fuzzing,stateful",
             "--workers", "2", "--seed", "1", "--request-timeout", "30", "--no-color",
             "--max-time", "45"],
            capture_output=True, text=True, timeout=300, cwd=tmp_path,  # its example database stays out of the repo
        )
        assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
        # The server is still healthy afterwards.
        assert httpx.get(url + "/readyz", timeout=10).status_code == 200
