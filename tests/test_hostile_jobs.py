"""A job that runs too long, or is stuck, is stopped: its worker's heartbeat enforces
DIFFICULTY_MAX_JOB_SECONDS (before, the heartbeat renewed the lease forever whether or not the
job progressed). No timing is asserted: only the final state and the message.

Cost: two in-process apps, ~3 s and ~4 s (the test-only chunk delay makes the jobs slow).
"""

from __future__ import annotations

import pytest
from conftest import make_settings, upload_blobs, wait_for_job
from fastapi.testclient import TestClient

from service.api.app import create_app
from service.domain import JobStage
from service.jobs import fit as fit_job
from service.jobs import queue
from service.jobs.context import JobContext, JobStopped


def test_job_past_its_maximum_run_time_is_stopped_and_failed(tmp_path):
    # 40 chunks x 0.3 s without the limit; the limit is 1 s: stopped at a chunk boundary.
    settings = make_settings(tmp_path / "data", max_job_seconds=1.0, chunk_rows=50, chunk_delay_seconds=0.3,
                             heartbeat_seconds=0.2)
    with TestClient(create_app(settings)) as c:
        dataset_id = upload_blobs(c, 2000, "slow")
        job = wait_for_job(c, c.post(f"/v1/datasets/{dataset_id}/fit").json()["job_id"], timeout=60)
        assert job["state"] == "failed", job
        assert "DIFFICULTY_MAX_JOB_SECONDS" in job["error"]
        assert job["progress"]["done"] < 2000
        assert c.get(f"/v1/datasets/{dataset_id}").json()["fit"] is None
        # The dataset is not blocked: a new fit can be queued.
        assert c.post(f"/v1/datasets/{dataset_id}/fit").status_code == 202


def test_stuck_job_is_failed_by_the_heartbeat(tmp_path):
    """A job stuck inside a step (here: a 6 s sleep before its first check) cannot see the stop
    request; a lease after its maximum run time the heartbeat fails it itself."""
    settings = make_settings(tmp_path / "data", max_job_seconds=0.5, lease_seconds=1.0, chunk_rows=50,
                             chunk_delay_seconds=6.0, heartbeat_seconds=0.2)
    with TestClient(create_app(settings)) as c:
        dataset_id = upload_blobs(c, 200, "slow")
        job = wait_for_job(c, c.post(f"/v1/datasets/{dataset_id}/fit").json()["job_id"], timeout=60)
        # Failed by the heartbeat, not by the job reaching its check after the sleep.
        assert job["state"] == "failed" and "did not stop when asked" in job["error"], job


def test_job_without_progress_is_stopped_as_stuck(tmp_path):
    """No progress for DIFFICULTY_JOB_STALL_SECONDS (here a 6 s step against 0.5 s): the lease
    is no longer renewed on faith; the job is asked to stop and, stuck, failed by its worker."""
    settings = make_settings(tmp_path / "data", job_stall_seconds=0.5, lease_seconds=1.0, chunk_rows=50,
                             chunk_delay_seconds=6.0, heartbeat_seconds=0.2)
    with TestClient(create_app(settings)) as c:
        dataset_id = upload_blobs(c, 200, "slow")
        job = wait_for_job(c, c.post(f"/v1/datasets/{dataset_id}/fit").json()["job_id"], timeout=60)
        assert job["state"] == "failed", job
        assert "DIFFICULTY_JOB_STALL_SECONDS" in job["error"] and "did not stop when asked" in job["error"], job


# -- cancellation inside a stage ----------------------------------------------------------------


class _CancelWhileScoring(JobContext):
    """A job context that, once the scoring stage has reported ``after`` chunks, asks for the
    job to stop: as the API's cancel (the job's row) or as the heartbeat's run-time limit (the
    context's flag). Counts the scoring progress reports."""

    def __init__(self, job_id: str, owner: str, db, *, after: int, via: str) -> None:
        super().__init__(job_id, owner)
        self.db, self.after, self.via = db, after, via
        self.scoring_reports = 0

    def progress(self, done: int, total: int | None = None) -> None:
        super().progress(done, total)
        if self.stage != JobStage.SCORING:
            return
        self.scoring_reports += 1
        if self.scoring_reports == self.after:
            if self.via == "cancel":
                with self.db() as session:
                    assert queue.request_cancel(session, self.job_id)
                    session.commit()
            else:
                self.cancel_requested = True  # what the heartbeat sets past DIFFICULTY_MAX_JOB_SECONDS


@pytest.mark.parametrize("via", ["cancel", "run-time limit"])
def test_a_fit_is_stopped_inside_its_scoring_stage(tmp_path, monkeypatch, via):
    """60 chunks of 10 rows; the stop comes after the 3rd scored chunk. Before, the scoring loop
    ran to its end (the stop was seen only between stages): here it stops at that chunk's report,
    and no fit is published. No timing: the poll interval is 0 and the assertions count chunks."""
    monkeypatch.setattr(fit_job, "STOP_POLL_SECONDS", 0.0)
    settings = make_settings(tmp_path / "data", chunk_rows=10)
    with TestClient(create_app(settings, run_worker=False)) as c:
        dataset_id = upload_blobs(c, 600, "slow")
        job_id = c.post(f"/v1/datasets/{dataset_id}/fit").json()["job_id"]
        db = c.app.state.ctx.db
        job = queue.claim(db, "test-worker", lease_seconds=60)
        assert job is not None and job.id == job_id
        ctx = _CancelWhileScoring(job_id, "test-worker", db, after=3, via=via)
        with pytest.raises(JobStopped):
            fit_job.run_fit_job(job, ctx, settings, db)
        assert ctx.stage == JobStage.SCORING
        assert ctx.scoring_reports == 3  # stopped at the chunk that saw the request, of 60
        assert not (tmp_path / "data" / "datasets" / dataset_id / "fits").exists()
