"""Routes under /v1/jobs."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from service.api import operations as ops
from service.api import schemas
from service.api.auth import tenant_of

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
Tenant = Annotated[str, Depends(tenant_of)]
ERRORS = {401: {"description": "missing or unknown API key"}, 404: {"description": "unknown job"}}


@router.get("/{job_id}", response_model=schemas.JobOut, responses=ERRORS)
def get_job(job_id: str, request: Request, tenant: Tenant) -> schemas.JobOut:
    return ops.get_job(request.app.state.ctx, tenant, job_id)


@router.post(
    "/{job_id}/cancel",
    response_model=schemas.JobOut,
    responses={**ERRORS, 409: {"description": "the job already finished"}},
)
def cancel_job(job_id: str, request: Request, tenant: Tenant) -> schemas.JobOut:
    return ops.cancel_job(request.app.state.ctx, tenant, job_id)
