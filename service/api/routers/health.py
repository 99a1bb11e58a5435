"""Liveness, readiness and Prometheus metrics (no authentication: no tenant data)."""

from __future__ import annotations

import tempfile

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from service.api import schemas

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=schemas.Health)
def healthz() -> schemas.Health:
    return schemas.Health(status="ok")


@router.get("/readyz", response_model=schemas.Health, responses={503: {"model": schemas.Health}})
def readyz(request: Request):
    ctx = request.app.state.ctx
    checks: dict[str, str] = {}
    try:
        with ctx.db() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as exc:
        checks["database"] = f"unreachable: {type(exc).__name__}"
    try:
        ctx.settings.tmp_dir.mkdir(parents=True, exist_ok=True)
        # A file of its own per check: concurrent probes must not delete each other's.
        with tempfile.NamedTemporaryFile(dir=ctx.settings.tmp_dir, prefix=".ready-") as probe:
            probe.write(b"ok")
            probe.flush()
        checks["data_dir"] = "ok"
    except OSError as exc:
        checks["data_dir"] = f"not writable: {exc.strerror}"
    ok = all(v == "ok" for v in checks.values())
    body = schemas.Health(status="ok" if ok else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@router.get("/metrics", response_class=Response, responses={200: {"content": {"text/plain": {}}}})
def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
