"""The FastAPI application factory."""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.api import errors
from service.api.limits import RequestLimits
from service.api.metrics import Metrics, MetricsMiddleware
from service.api.routers import datasets, health, jobs, samples, ui
from service.settings import Settings
from service.storage.database import engine_of, open_database
from service.storage.sweep import sweep
from service.usecases.context import AppContext

log = logging.getLogger(__name__)


def create_app(settings: Settings, *, run_worker: bool = True) -> FastAPI:
    """The app. With ``run_worker`` an in-process worker thread runs queued jobs (the embedded
    default); without, separate ``difficulty worker`` processes must run them."""
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        settings.tmp_dir.mkdir(parents=True, exist_ok=True)
        db = open_database(settings)
        try:  # what a crash left without a row: housekeeping, never a reason not to start
            sweep(settings.data_dir, db, grace_seconds=settings.orphan_grace_seconds)
        except Exception:
            log.exception("start-up sweep failed")
        app.state.ctx = AppContext(settings=settings, db=db)
        metrics.attach_database(db)
        worker = None
        if run_worker:
            from service.jobs.worker import Worker

            worker = Worker(settings, db, name=None)
            thread = threading.Thread(target=worker.run_forever, name="job-worker", daemon=True)
            thread.start()
        try:
            yield
        finally:
            if worker is not None:
                worker.stop_event.set()
            engine_of(db).dispose()

    app = FastAPI(
        title="Sample difficulty service",
        version="1.0.0",
        description="Per-sample difficulty (relative Mahalanobis distance) from frozen pre-trained "
        "encoders. Authenticate with 'Authorization: Bearer <key>' when the server has API keys.",
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    app.include_router(datasets.router)
    app.include_router(samples.router)  # after datasets: its /samples/{id}/neighbors matches first
    app.include_router(ui.router)
    app.include_router(jobs.router)
    app.include_router(health.router)
    errors.register(app)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestLimits, settings=settings)  # outermost: before any body is read
    _document_auth(app)
    return app


def _document_auth(app: FastAPI) -> None:
    """Declare the bearer scheme in the OpenAPI document (enforced by api.auth.tenant_of)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = {
                "apiKey": {"type": "http", "scheme": "bearer", "description": "a key from DIFFICULTY_API_KEYS"}
            }
            for path, operations in schema["paths"].items():
                if path.startswith("/v1/"):
                    for operation in operations.values():
                        operation["security"] = [{"apiKey": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
