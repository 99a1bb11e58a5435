"""What a running job sees of its worker: progress reporting and the stop signal."""

from __future__ import annotations

import threading
import time
from typing import Any


class JobStopped(Exception):
    """The job must stop now: cancelled by a user, or its lease went to another worker."""


class JobFailed(Exception):
    """The job cannot finish; the message tells a person what to change."""


class JobContext:
    def __init__(self, job_id: str, owner: str, *, chunk_delay_seconds: float = 0.0) -> None:
        self.job_id = job_id
        self.owner = owner
        self.chunk_delay_seconds = chunk_delay_seconds
        self.stage: str | None = None
        self.done = 0
        self.total: int | None = None
        self._stage_started = time.monotonic()
        self._stage_done0 = 0
        self.cancel_requested = False
        self.lease_lost = False
        self._lock = threading.Lock()
        self.changed = threading.Event()

    def set_stage(self, stage: str, total: int | None, done: int = 0) -> None:
        with self._lock:
            self.stage, self.total, self.done = stage, total, done
            self._stage_started, self._stage_done0 = time.monotonic(), done
        self.changed.set()

    def progress(self, done: int, total: int | None = None) -> None:
        with self._lock:
            self.done = done
            if total is not None:
                self.total = total
        self.changed.set()

    def should_stop(self) -> bool:
        return self.cancel_requested or self.lease_lost

    def check(self) -> None:
        if self.lease_lost:
            raise JobStopped("lease lost: another worker owns this job now")
        if self.cancel_requested:
            raise JobStopped("cancelled")

    def chunk_finished(self) -> None:
        """Called after each durable chunk: the resume point. The delay is a test setting."""
        if self.chunk_delay_seconds > 0:
            time.sleep(self.chunk_delay_seconds)
        self.check()

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            elapsed = time.monotonic() - self._stage_started
            rate = (self.done - self._stage_done0) / elapsed if elapsed > 0.5 else None
            eta = None
            if rate and self.total is not None and rate > 0:
                eta = max(self.total - self.done, 0) / rate
            return {
                "stage": self.stage,
                "done": self.done,
                "total": self.total,
                "per_second": round(rate, 3) if rate is not None else None,
                "eta_seconds": round(eta, 1) if eta is not None else None,
            }
