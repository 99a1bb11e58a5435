"""Prometheus metrics: requests, latency, jobs by state, images embedded."""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import func, select
from starlette.types import ASGIApp, Receive, Scope, Send

from service.storage.database import Upload


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "difficulty_http_requests", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "difficulty_http_request_seconds",
            "HTTP request latency",
            ["method", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )

    def attach_database(self, db) -> None:  # type: ignore[no-untyped-def]
        self.registry.register(_DatabaseCollector(db))


class _DatabaseCollector:
    """Values every process shares (the workers may be other processes): read at scrape time."""

    def __init__(self, db) -> None:  # type: ignore[no-untyped-def]
        self.db = db

    def collect(self):  # type: ignore[no-untyped-def]
        from service.jobs.queue import counts_by_state

        jobs = GaugeMetricFamily("difficulty_jobs", "Jobs by state", labels=["state"])
        embedded = GaugeMetricFamily(
            "difficulty_items_embedded", "Items embedded (images and uploaded embeddings), all datasets"
        )
        failed = GaugeMetricFamily("difficulty_items_failed", "Items skipped as corrupt, all datasets")
        try:
            with self.db() as session:
                counts = counts_by_state(session)
                done = session.scalar(select(func.coalesce(func.sum(Upload.num_embedded), 0)))
                bad = session.scalar(select(func.coalesce(func.sum(Upload.num_failed), 0)))
        except Exception:
            return
        for state in ("queued", "running", "succeeded", "failed", "cancelled"):
            jobs.add_metric([state], counts.get(state, 0))
        embedded.add_metric([], float(done or 0))
        failed.add_metric([], float(bad or 0))
        yield jobs
        yield embedded
        yield failed


class MetricsMiddleware:
    """Counts and times every request by its route template (not the raw path: bounded labels)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def send_wrapper(message) -> None:  # type: ignore[no-untyped-def]
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(method, template, str(status["code"])).inc()
            self.metrics.latency.labels(method, template).observe(time.perf_counter() - start)
