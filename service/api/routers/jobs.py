"""Routes under /v1/jobs."""

from __future__ import annotations

from fastapi import APIRouter

from service import schemas
from service.api.deps import Context, Tenant
from service.usecases import jobs

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
