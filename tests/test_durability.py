"""What the data dir keeps over time: superseded fits are retired (DIFFICULTY_KEEP_FITS), and
folders a crash left without a database row are collected at start-up after a grace period.

Before: every fit kept its folder and row forever, and only stale spool folders were swept.
Cost: ~5 s (four small fits in an in-process app).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from conftest import make_settings, upload_blobs, wait_for_job
from fastapi.testclient import TestClient
from sqlalchemy import select

from service.api.app import create_app
from service.storage.database import Fit, new_id


def _fit(c: TestClient, dataset_id: str) -> str:
    response = c.post(f"/v1/datasets/{dataset_id}/fit")
    assert response.status_code == 202, response.text
    job = wait_for_job(c, response.json()["job_id"])
    assert job["state"] == "succeeded", job
    return job["result"]["fit_id"]


def _folders_when(fits_dir: Path, expected: set[str], timeout: float = 10.0) -> set[str]:
    """The fit folders once they equal ``expected``, or as they stand at the timeout."""
    deadline = time.monotonic() + timeout
    while (folders := {p.name for p in fits_dir.iterdir()}) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return folders


def test_superseded_fits_are_retired_beyond_the_kept_number(tmp_path):
    data_dir = tmp_path / "data"
    with TestClient(create_app(make_settings(data_dir, keep_fits=1))) as c:
        dataset_id = upload_blobs(c, 120, "d")
        other_id = upload_blobs(c, 120, "d")
        other_fit = _fit(c, other_id)
        fits = [_fit(c, dataset_id) for _ in range(3)]
        # The worker removes retired folders just after the commit that makes the job read as
        # succeeded, so a poll can see the job done a moment before the last folder is gone.
        fits_dir = data_dir / "datasets" / dataset_id / "fits"
        assert _folders_when(fits_dir, set(fits[1:])) == set(fits[1:])  # the current fit and one before it
        with c.app.state.ctx.db() as session:
            rows = set(session.scalars(select(Fit.id).where(Fit.dataset_id == dataset_id)))
            assert rows == set(fits[1:])
            assert session.get(Fit, other_fit) is not None  # another dataset's fit is untouched
        assert (data_dir / "datasets" / other_id / "fits" / other_fit).is_dir()
        response = c.get(f"/v1/datasets/{dataset_id}/scores")
        assert response.status_code == 200 and response.headers["X-Fit-Id"] == fits[-1]
        assert c.get(f"/v1/datasets/{dataset_id}").json()["fit"]["id"] == fits[-1]


# -- orphans at start-up ------------------------------------------------------------------------


def _age(path: Path, seconds: float) -> None:
    """Make everything in ``path`` look last written ``seconds`` ago."""
    then = time.time() - seconds
    for root, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            os.utime(os.path.join(root, name), (then, then))
    os.utime(path, (then, then))


def _orphan(folder: Path, *, age: float | None) -> Path:
    folder.mkdir(parents=True)
    (folder / "model.npz").write_bytes(b"left by a crash")
    if age is not None:
        _age(folder, age)
    return folder


def test_orphaned_folders_are_collected_at_start_up_after_the_grace_period(tmp_path):
    data_dir = tmp_path / "data"
    settings = make_settings(data_dir, orphan_grace_seconds=600)
    with TestClient(create_app(settings)) as c:
        dataset_id = upload_blobs(c, 120, "d")
        fit_id = _fit(c, dataset_id)
    root = data_dir / "datasets" / dataset_id
    (upload_folder,) = (root / "uploads").iterdir()
    _age(data_dir / "datasets", 3600)  # the real folders are old too: their rows keep them
    old_upload = _orphan(root / "uploads" / new_id(), age=3600)
    fresh_upload = _orphan(root / "uploads" / new_id(), age=None)  # renamed, commit under way
    old_fit = _orphan(root / "fits" / new_id(), age=3600)
    fresh_fit = _orphan(root / "fits" / new_id(), age=60)  # published, commit under way
    deleted_dataset = _orphan(data_dir / "datasets" / new_id() / "embeddings", age=3600).parent
    _age(deleted_dataset, 3600)
    not_ours = _orphan(root / "fits" / "not an id", age=3600)
    stale_spool = _orphan(data_dir / "tmp" / f"upload-{new_id()}", age=25 * 3600)

    with TestClient(create_app(settings)) as c:
        for gone in (old_upload, old_fit, deleted_dataset, stale_spool):
            assert not gone.exists(), gone
        for kept in (fresh_upload, fresh_fit, not_ours, upload_folder, root / "fits" / fit_id, root / "embeddings"):
            assert kept.exists(), kept
        response = c.get(f"/v1/datasets/{dataset_id}/scores")
        assert response.status_code == 200 and response.headers["X-Fit-Id"] == fit_id
        assert _fit(c, dataset_id)  # the dataset still fits (its upload and store are whole)


def test_a_database_that_knows_no_dataset_folder_sweeps_none(tmp_path):
    """Started against another database (a misconfigured URL), the service must not take every
    dataset folder for an orphan."""
    data_dir = tmp_path / "data"
    with TestClient(create_app(make_settings(data_dir))) as c:
        dataset_id = upload_blobs(c, 120, "d")
    _age(data_dir / "datasets", 3600)
    other = make_settings(data_dir, database_url=f"sqlite:///{tmp_path / 'other.db'}", orphan_grace_seconds=600)
    with TestClient(create_app(other)):
        pass
    assert (data_dir / "datasets" / dataset_id / "uploads").is_dir()
