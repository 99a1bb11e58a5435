"""The worker loop: claim a job, run it under a heartbeat-renewed lease, record the outcome.

The embedded server runs one ``Worker`` in a thread; ``difficulty worker`` runs it as its own
process (start several to scale). Workers share nothing but the database and the data dir.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shutil
import signal
import socket
import threading
import time
import traceback
import uuid

from sqlalchemy.orm import sessionmaker

from service.domain import JobKind, JobState
from service.jobs import queue
from service.jobs.context import JobContext, JobFailed, JobStopped
from service.jobs.fit import run_fit_job
from service.jobs.scoring import release_inputs, run_score_job
from service.settings import Settings, SettingsError, load_settings
from service.storage.database import Job, engine_of, open_database

log = logging.getLogger("service.worker")

# Counts for /metrics in the embedded server (separate workers report through the database).


class Worker:
    def __init__(self, settings: Settings, db: sessionmaker, name: str | None = None) -> None:
        self.settings = settings
        self.db = db
        self.owner = name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.stop_event = threading.Event()
        # Jobs past a run-time or progress limit: job id -> (when, reason), set by the heartbeat.
        self._overdue: dict[str, tuple[float, str]] = {}

    def run_forever(self) -> None:
        while not self.stop_event.is_set():
            try:
                ran = self.run_once()
            except Exception:  # the database may be briefly unreachable: keep the loop alive
                log.exception("worker loop error")
                ran = False
            if not ran:
                self.stop_event.wait(self.settings.poll_seconds)

    def run_once(self) -> bool:
        job = queue.claim(self.db, self.owner, self.settings.lease_seconds)
        if job is None:
            return False
        log.info("job %s claimed by %s (attempt %d)", job.id, self.owner, job.attempts)
        try:
            self.execute(job)
        finally:
            release_inputs(self.settings, self.db, job.id)  # a scoring's archive, once it is final
        return True

    def execute(self, job: Job) -> None:
        if job.cancel_requested:
            queue.finish(self.db, job.id, self.owner, JobState.CANCELLED, error="cancelled by request")
            return
        if job.attempts > queue.MAX_ATTEMPTS:
            queue.finish(
                self.db,
                job.id,
                self.owner,
                JobState.FAILED,
                error=f"the job was interrupted {job.attempts - 1} times (its workers died); "
                "check the worker logs (out of memory?) and start a new fit",
            )
            return
        ctx = JobContext(job.id, self.owner, chunk_delay_seconds=self.settings.chunk_delay_seconds)
        finished = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(ctx, finished), daemon=True)
        beat.start()
        try:
            if job.kind == JobKind.FIT:
                run_fit_job(job, ctx, self.settings, self.db)
            elif job.kind == JobKind.SCORE:
                run_score_job(job, ctx, self.settings, self.db)
            else:
                raise JobFailed(f"unknown job kind {job.kind!r}")
        except JobStopped:
            if job.id in self._overdue:
                queue.finish(self.db, job.id, self.owner, JobState.FAILED, error=self._overdue[job.id][1],
                             progress=ctx.snapshot())
            elif ctx.cancel_requested and not ctx.lease_lost:
                queue.finish(self.db, job.id, self.owner, JobState.CANCELLED, error="cancelled by request",
                             progress=ctx.snapshot())
            log.info("job %s stopped (%s)", job.id, "cancelled" if ctx.cancel_requested else "lease lost")
        except JobFailed as exc:
            queue.finish(self.db, job.id, self.owner, JobState.FAILED, error=str(exc), progress=ctx.snapshot())
        except Exception as exc:  # keep the worker alive; tell the user what happened and where
            log.error("job %s failed:\n%s", job.id, traceback.format_exc())
            queue.finish(
                self.db,
                job.id,
                self.owner,
                JobState.FAILED,
                error=f"unexpected error during {ctx.stage or 'start-up'}: {type(exc).__name__}: {exc} "
                "(the worker log has the traceback; retry the fit, and report it if it repeats)",
            )
        finally:
            finished.set()
            beat.join(timeout=5)
            self._overdue.pop(job.id, None)
            self._remove_if_deleted(job.dataset_id)

    def _limit_exceeded(self, started: float, last_progress: float, now: float) -> str | None:
        """Why the job must stop (None while it may run): past its maximum run time, or no
        progress reported for DIFFICULTY_JOB_STALL_SECONDS (a stuck step)."""
        limit, stall = self.settings.max_job_seconds, self.settings.job_stall_seconds
        if limit > 0 and now - started > limit:
            return (f"the job ran longer than {limit:g} s (DIFFICULTY_MAX_JOB_SECONDS) and was stopped; "
                    "split the dataset or ask the operator to raise the limit")
        if stall > 0 and now - last_progress > stall:
            return (f"the job reported no progress for {stall:g} s (DIFFICULTY_JOB_STALL_SECONDS) and was "
                    "stopped as stuck; retry the fit, and check the worker log if it repeats")
        return None

    def _stop_if_overdue(self, ctx: JobContext, started: float, last_progress: float, now: float) -> bool:
        """Past a limit: ask the job to stop at its next check (it is then failed with the
        reason). A job that still has not stopped a lease later is failed here and its lease is
        no longer renewed, so nothing it writes afterwards can finish it. True when the
        heartbeat should end."""
        if ctx.job_id not in self._overdue:
            reason = self._limit_exceeded(started, last_progress, now)
            if reason is None:
                return False
            log.warning("job %s: %s", ctx.job_id, reason)
            self._overdue[ctx.job_id] = (now, reason)
            ctx.cancel_requested = True
            return False
        flagged, reason = self._overdue[ctx.job_id]
        if now - flagged <= self.settings.lease_seconds:
            return False
        log.error("job %s did not stop within a lease after it was asked to: failing it", ctx.job_id)
        ctx.lease_lost = True
        queue.finish(self.db, ctx.job_id, self.owner, JobState.FAILED,
                     error=reason + " (it did not stop when asked: its worker failed it)", progress=ctx.snapshot())
        return True

    def _remove_if_deleted(self, dataset_id: str) -> None:
        # A dataset deleted while its job ran: the job may have written files after the API
        # removed the folder.
        from service.storage import layout
        from service.storage.database import Dataset

        with self.db() as session:
            exists = session.get(Dataset, dataset_id) is not None
        if not exists:
            shutil.rmtree(layout.dataset_dir(self.settings.data_dir, dataset_id), ignore_errors=True)

    def _heartbeat(self, ctx: JobContext, finished: threading.Event) -> None:
        # Publishes progress about once a second and renews the lease; a lost lease or a cancel
        # request is seen by the job at its next chunk boundary.
        interval = min(1.0, self.settings.heartbeat_seconds)
        last_renew = 0.0
        started = last_progress = time.monotonic()
        while not finished.wait(interval):
            now = time.monotonic()
            if ctx.changed.is_set():
                last_progress = now
            try:
                if self._stop_if_overdue(ctx, started, last_progress, now):
                    return
            except Exception:
                log.exception("run-time check failed")
            if not ctx.changed.is_set() and now - last_renew < self.settings.heartbeat_seconds:
                continue
            ctx.changed.clear()
            try:
                snapshot = ctx.snapshot()
                owned, cancel = queue.heartbeat(
                    self.db,
                    ctx.job_id,
                    self.owner,
                    self.settings.lease_seconds,
                    stage=snapshot.pop("stage"),
                    progress=snapshot,
                )
                last_renew = now
            except Exception:
                log.exception("heartbeat failed")
                continue
            ctx.lease_lost = ctx.lease_lost or not owned
            ctx.cancel_requested = ctx.cancel_requested or cancel


def worker_command(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(getattr(args, "data_dir", None))
    except SettingsError as exc:
        print(f"difficulty worker: error: {exc}")
        return 2
    db = open_database(settings)
    worker = Worker(settings, db)
    signal.signal(signal.SIGTERM, lambda *_: worker.stop_event.set())
    log.info("worker %s: data dir %s, database %s", worker.owner, settings.data_dir,
             engine_of(db).url.render_as_string(hide_password=True))
    if getattr(args, "once", False):
        worker.run_once()
        return 0
    with contextlib.suppress(KeyboardInterrupt):
        worker.run_forever()
    return 0
