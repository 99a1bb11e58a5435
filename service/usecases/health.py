"""Readiness: the database answers and the data dir takes writes."""

from __future__ import annotations

import tempfile

from sqlalchemy import text

from service import schemas
from service.usecases.context import AppContext


def readiness(ctx: AppContext) -> schemas.Health:
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
    return schemas.Health(status="ok" if ok else "unavailable", checks=checks)
