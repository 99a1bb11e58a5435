"""Routes under /v1/jobs."""

from __future__ import annotations

from typing import Annotated, Literal

import orjson
from fastapi import APIRouter, Query, Response
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from service import schemas
from service.api.deps import Context, PageCursor, Tenant
from service.storage.scorings import ARROW_FILE
from service.usecases import jobs, scores

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
ERRORS = {401: {"description": "missing or unknown API key"}, 404: {"description": "unknown job"}}


@router.get("/{job_id}", response_model=schemas.JobOut, responses=ERRORS)
def get_job(job_id: str, ctx: Context, tenant: Tenant) -> schemas.JobOut:
    return jobs.get_job(ctx, tenant, job_id)


@router.post(
    "/{job_id}/cancel",
    response_model=schemas.JobOut,
    responses={**ERRORS, 409: {"description": "the job already finished"}},
)
def cancel_job(job_id: str, ctx: Context, tenant: Tenant) -> schemas.JobOut:
    return jobs.cancel_job(ctx, tenant, job_id)


@router.get(
    "/{job_id}/result",
    response_model=schemas.ScoringResult,
    responses={
        **ERRORS,
        200: {"description": "a JSON page in archive order, or the whole table with format=arrow (Arrow IPC file)",
              "content": {ARROW_FILE: {}}},
        400: {"description": "malformed cursor"},
        404: {"description": "unknown job (or another tenant's), a fit job, or its dataset was deleted"},
        409: {"description": "the scoring job has not succeeded (queued, running, failed or cancelled)"},
    },
)
async def get_result(
    job_id: str,
    ctx: Context,
    tenant: Tenant,
    limit: Annotated[int, Query(ge=1, le=100000)] = 1000,
    cursor: PageCursor = None,
    format: Literal["json", "arrow"] = "json",
):  # type: ignore[no-untyped-def]
    """An archive scoring's result (``POST /v1/datasets/{id}/score`` with ``file``)."""
    page, files = await run_in_threadpool(
        scores.scoring_result, ctx, tenant, job_id, limit=None if format == "arrow" else limit, cursor=cursor
    )
    if page is None:
        return FileResponse(files.result_path, media_type=ARROW_FILE, filename=f"scores-{job_id}.arrow")
    return Response(orjson.dumps(page.model_dump()), media_type="application/json")
