"""Archive scoring as a job (finding 10), in-process on SQLite and PostgreSQL: ``POST .../score``
with an archive answers 202 and a job; the job embeds with the fit's encoder (the tiny test
CLIP), reports progress, can be cancelled queued or running, and leaves a result equal to the
synchronous embeddings path on the same features. Another tenant sees none of it. The archive
and its embeddings are removed once the job is final. The worker is driven by the tests
(``run_worker=False`` and ``Worker.run_once``), so every job runs exactly when a test says.

The attack from outside (a burst of archive scorings against the real server must not embed in
the API process) is ``tests/test_hostile_scoring.py``.

Cost: about 20 s per database (one tiny-encoder image fit, a few scoring jobs)."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from apiserver import database_for
from conftest import make_settings, npy, wait_for_job
from fastapi.testclient import TestClient
from imagedata import TINY_CLIP, save_tiny_clip_checkpoint, write_image_folder, zip_folder
from sqlalchemy import select

from service.api.app import create_app
from service.jobs.worker import Worker
from service.storage import layout
from service.storage.embeddings import EmbeddingStore

KEYS = {"alice": "alice-key-0123456789", "bob": "bob-key-0123456789ab"}
ALICE = {"Authorization": f"Bearer {KEYS['alice']}"}
BOB = {"Authorization": f"Bearer {KEYS['bob']}"}
PER_CLASS = 8  # 3 classes: 24 images
CHUNK_ROWS = 4  # several chunks per archive: progress and cancellation between them


class Authorised:
    """``wait_for_job``'s client, with a tenant's key."""

    def __init__(self, client: TestClient, headers: dict) -> None:
        self.client, self.headers = client, headers

    def get(self, url: str):  # type: ignore[no-untyped-def]
        return self.client.get(url, headers=self.headers)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def env(request, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp(f"score-jobs-{request.param}")
    encoder = f"open_clip:{TINY_CLIP}:{save_tiny_clip_checkpoint(root / 'tiny')}"
    images = root / "images"
    write_image_folder(images, per_class=PER_CLASS, size=48)
    with database_for(request.param) as db_url:
        overrides = {"database_url": db_url} if db_url else {}
        settings = make_settings(
            root / "data",
            api_keys={key: tenant for tenant, key in KEYS.items()},
            allowed_encoders=(encoder,),
            image_chunk_rows=CHUNK_ROWS,
            max_active_jobs_per_tenant=2,
            lease_seconds=30.0,
            heartbeat_seconds=0.2,
            **overrides,
        )
        with TestClient(create_app(settings, run_worker=False)) as client:
            db = client.app.state.ctx.db
            dataset_id = client.post("/v1/datasets", json={"name": "img", "encoder": encoder}, headers=ALICE).json()["id"]
            upload = client.post(f"/v1/datasets/{dataset_id}/items", files={"file": ("i.zip", zip_folder(images))},
                                 headers=ALICE)
            assert upload.status_code == 201, upload.text
            fit = client.post(f"/v1/datasets/{dataset_id}/fit", json={"shrinkage": 0.1}, headers=ALICE)
            assert Worker(settings, db).run_once()
            job = wait_for_job(Authorised(client, ALICE), fit.json()["job_id"])
            assert job["state"] == "succeeded", job["error"]
            yield {"client": client, "settings": settings, "db": db, "dataset": dataset_id, "images": images,
                   "fit_id": job["result"]["fit_id"]}


def queue_scoring(env: dict, archive: bytes) -> str:
    response = env["client"].post(f"/v1/datasets/{env['dataset']}/score", files={"file": ("s.zip", archive)},
                                  headers=ALICE)
    assert response.status_code == 202, response.text
    assert response.json()["state"] == "queued"
    return response.json()["job_id"]


def job(env: dict, job_id: str, headers: dict = ALICE) -> dict:
    response = env["client"].get(f"/v1/jobs/{job_id}", headers=headers)
    assert response.status_code == 200, response.text
    return response.json()


def scoring_folder(env: dict, job_id: str) -> Path:
    return layout.scoring_dir(env["settings"].data_dir, env["dataset"], job_id)


def all_result_items(env: dict, job_id: str, limit: int) -> tuple[list[dict], dict]:
    """Every item, following the cursors; and the first page."""
    items, cursor, first = [], None, None
    while True:
        params = {"limit": limit, **({"cursor": cursor} if cursor else {})}
        page = env["client"].get(f"/v1/jobs/{job_id}/result", params=params, headers=ALICE)
        assert page.status_code == 200, page.text
        body = page.json()
        first = first or body
        items += body["items"]
        cursor = body["next_cursor"]
        if cursor is None:
            return items, first


def test_archive_scoring_is_a_job_with_the_scores_of_the_embeddings_path(env: dict) -> None:
    client = env["client"]
    broken = {"red/broken.jpg": b"\xff\xd8\xff\xe0 not a jpeg"}
    job_id = queue_scoring(env, zip_folder(env["images"], broken))
    # Nothing ran yet: the request only stored the archive.
    queued = job(env, job_id)
    assert queued["kind"] == "score" and queued["state"] == "queued" and queued["progress"]["done"] == 0
    assert (scoring_folder(env, job_id) / "archive").is_file()
    assert [j["id"] for j in client.get(f"/v1/datasets/{env['dataset']}/jobs", headers=ALICE).json()][0] == job_id
    early = client.get(f"/v1/jobs/{job_id}/result", headers=ALICE)
    assert early.status_code == 409 and "queued" in early.json()["detail"]

    assert Worker(env["settings"], env["db"]).run_once()
    done = job(env, job_id)
    n = 3 * PER_CLASS
    assert done["state"] == "succeeded", done
    assert done["stage"] == "done" and done["progress"]["done"] == done["progress"]["total"] == n
    assert done["result"] == {"fit_id": env["fit_id"], "num_scored": n, "num_failed": 1}
    # The inputs are gone once the job is final; the result stays.
    folder = scoring_folder(env, job_id)
    assert not (folder / "archive").exists() and not (folder / "embeddings").exists()

    items, first = all_result_items(env, job_id, limit=5)
    assert first["fit_id"] == env["fit_id"] and first["num_scored"] == n and first["num_failed"] == 1
    assert first["failures"] == [{"sample_id": "red/broken.jpg", "reason": first["failures"][0]["reason"]}]
    assert len(items) == n and len({i["sample_id"] for i in items}) == n

    # The same images' features (the fit embedded them with the same encoder and chunking),
    # scored in the request: the same scores.
    store = EmbeddingStore(layout.store_dir(env["settings"].data_dir, env["dataset"]))
    chunks = list(store.iter_chunks())
    ids = np.concatenate([c.sample_ids for c in chunks]).tolist()
    labels = np.concatenate([c.labels for c in chunks]).tolist()
    features = np.concatenate([c.features for c in chunks])
    sync = client.post(
        f"/v1/datasets/{env['dataset']}/score",
        files={"embeddings": ("e.npy", npy(features)), "labels": ("l.txt", "\n".join(labels)),
               "ids": ("i.txt", "\n".join(ids))},
        headers=ALICE,
    )
    assert sync.status_code == 200, sync.text
    expected = {i["sample_id"]: i for i in sync.json()["items"]}
    assert set(expected) == {i["sample_id"] for i in items}
    for item in items:
        want = expected[item["sample_id"]]
        assert set(item) == set(want)
        assert (item["label"], item["predicted_label"]) == (want["label"], want["predicted_label"])
        for column in ("rmd", "md_class", "md_agnostic", "rmd_min"):
            assert item[column] == pytest.approx(want[column], rel=1e-4, abs=1e-4), column

    # The whole table as an Arrow IPC file: the same rows as the pages.
    arrow = client.get(f"/v1/jobs/{job_id}/result", params={"format": "arrow"}, headers=ALICE)
    assert arrow.status_code == 200 and arrow.headers["content-type"] == "application/vnd.apache.arrow.file"
    table = pa.ipc.open_file(pa.py_buffer(arrow.content)).read_all()
    assert table.to_pylist() == items
    bad = client.get(f"/v1/jobs/{job_id}/result", params={"cursor": "not-a-cursor"}, headers=ALICE)
    assert bad.status_code == 400


def test_a_queued_scoring_is_cancelled_and_its_archive_removed(env: dict) -> None:
    job_id = queue_scoring(env, zip_folder(env["images"]))
    cancelled = env["client"].post(f"/v1/jobs/{job_id}/cancel", headers=ALICE)
    assert cancelled.status_code == 200 and cancelled.json()["state"] == "cancelled"
    assert not (scoring_folder(env, job_id) / "archive").exists()
    refused = env["client"].get(f"/v1/jobs/{job_id}/result", headers=ALICE)
    assert refused.status_code == 409 and "cancelled" in refused.json()["detail"]


def wait_for_progress(env: dict, job_id: str, timeout: float = 120.0) -> dict:
    """The job once it is running with some items embedded (or final)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = job(env, job_id)
        if state["state"] in ("succeeded", "failed", "cancelled") or (
            state["state"] == "running" and state["progress"]["done"] > 0
        ):
            return state
        time.sleep(0.05)
    raise TimeoutError(f"job {job_id} reported no progress in {timeout} s")


def test_a_running_scoring_reports_progress_and_stops_when_cancelled(env: dict) -> None:
    job_id = queue_scoring(env, zip_folder(env["images"]))
    # Two images per chunk and a pause after each chunk: twelve chunks, seconds apart.
    slow = dataclasses.replace(env["settings"], chunk_delay_seconds=1.0, image_chunk_rows=2)
    thread = threading.Thread(target=Worker(slow, env["db"]).run_once, daemon=True)
    thread.start()
    seen = wait_for_progress(env, job_id)
    n = 3 * PER_CLASS
    assert seen["state"] == "running", seen
    assert seen["stage"] == "embedding" and seen["progress"]["total"] == n and 0 < seen["progress"]["done"] < n
    cancel = env["client"].post(f"/v1/jobs/{job_id}/cancel", headers=ALICE)
    assert cancel.status_code == 200 and cancel.json()["cancel_requested"] is True
    thread.join(120)
    assert not thread.is_alive()
    final = job(env, job_id)
    assert final["state"] == "cancelled" and final["error"] == "cancelled by request", final
    assert final["progress"]["done"] < n
    folder = scoring_folder(env, job_id)
    assert not (folder / "archive").exists() and not (folder / "embeddings").exists()
    assert not (folder / "result.arrow").exists()


def test_another_tenant_cannot_tell_a_scoring_from_a_missing_one(env: dict) -> None:
    client = env["client"]
    job_id = queue_scoring(env, zip_folder(env["images"]))
    unknown = client.get("/v1/jobs/0123456789abcdef/result", headers=BOB)
    assert unknown.status_code == 404
    for answer in (
        client.get(f"/v1/jobs/{job_id}", headers=BOB),
        client.get(f"/v1/jobs/{job_id}/result", headers=BOB),
        client.post(f"/v1/jobs/{job_id}/cancel", headers=BOB),
    ):
        assert answer.status_code == 404 and answer.json() == {"detail": "job not found"}
    scored = client.post(f"/v1/datasets/{env['dataset']}/score", files={"file": ("s.zip", zip_folder(env["images"]))},
                         headers=BOB)
    assert scored.status_code == 404 and scored.json() == {"detail": "dataset not found"}
    assert Worker(env["settings"], env["db"]).run_once()
    assert job(env, job_id)["state"] == "succeeded"
    after = client.get(f"/v1/jobs/{job_id}/result", headers=BOB)
    assert after.status_code == 404 and after.json() == unknown.json() == {"detail": "job not found"}
    assert client.get(f"/v1/jobs/{job_id}/result", headers=ALICE).status_code == 200
    jobs = client.get(f"/v1/datasets/{env['dataset']}/jobs", headers=ALICE).json()
    fit_job_id = next(j["id"] for j in jobs if j["kind"] == "fit")
    fit_job = client.get(f"/v1/jobs/{fit_job_id}/result", headers=ALICE)
    assert fit_job.status_code == 404 and "fit" in fit_job.json()["detail"]


@pytest.fixture
def cancel_leftovers(env: dict) -> Iterator[None]:
    yield
    from service.domain import ACTIVE_JOB_STATES
    from service.storage.database import Job

    with env["db"]() as session:
        active = session.scalars(select(Job.id).where(Job.state.in_(ACTIVE_JOB_STATES))).all()
    for job_id in active:
        env["client"].post(f"/v1/jobs/{job_id}/cancel", headers=ALICE)


def test_scorings_count_against_the_active_jobs_quota_and_one_job_per_dataset(env: dict, cancel_leftovers) -> None:
    client = env["client"]
    job_id = queue_scoring(env, zip_folder(env["images"]))
    again = client.post(f"/v1/datasets/{env['dataset']}/score", files={"file": ("s.zip", zip_folder(env["images"]))},
                        headers=ALICE)
    assert again.status_code == 409 and job_id in again.json()["detail"]
    refit = client.post(f"/v1/datasets/{env['dataset']}/fit", json={}, headers=ALICE)
    assert refit.status_code == 409
    rng = np.random.default_rng(0)
    answers = []
    for _ in range(2):
        dataset_id = client.post("/v1/datasets", json={"name": "e"}, headers=ALICE).json()["id"]
        files = {"embeddings": ("e.npy", npy(rng.normal(size=(30, 4)).astype(np.float32))),
                 "labels": ("l.txt", "\n".join(str(i % 2) for i in range(30)))}
        assert client.post(f"/v1/datasets/{dataset_id}/embeddings", files=files, headers=ALICE).status_code == 201
        answers.append(client.post(f"/v1/datasets/{dataset_id}/fit", json={}, headers=ALICE))
    # The queued scoring holds one of the tenant's two slots: one fit more, then 413.
    assert answers[0].status_code == 202
    assert answers[1].status_code == 413 and "DIFFICULTY_MAX_ACTIVE_JOBS_PER_TENANT" in answers[1].json()["detail"]
