"""Routes for one sample's evidence and thumbnail, the 2-D map and the embeddings export (what
the dashboard reads; each one usable without it). Thin: parse, authorise, call, serialise."""

from __future__ import annotations

import zlib
from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import run_in_threadpool

from service import schemas
from service.api.deps import Context, Tenant
from service.storage.thumbnails import MEDIA_TYPE
from service.usecases import samples

router = APIRouter(prefix="/v1/datasets", tags=["samples"])
ARROW_STREAM = "application/vnd.apache.arrow.stream"
ERRORS = {
    401: {"description": "missing or unknown API key"},
    404: {"description": "unknown dataset (or another tenant's) or sample"},
}
NOT_FITTED = {409: {"description": "not fitted yet"}}


@router.get(
    "/{dataset_id}/embeddings",
    responses={
        **ERRORS,
        200: {
            "description": "the stored features with sample IDs and labels, streamed: npy (one "
            "structured array: sample_id, label, features), an Arrow IPC stream, or Parquet",
            "content": {"application/octet-stream": {}, ARROW_STREAM: {}, "application/vnd.apache.parquet": {}},
        },
        409: {"description": "no embeddings yet"},
    },
)
async def export_embeddings(
    dataset_id: str, ctx: Context, tenant: Tenant, format: Literal["npy", "arrow", "parquet"] = "arrow"
) -> StreamingResponse:
    body = await run_in_threadpool(samples.embeddings_export, ctx, tenant, dataset_id, format)
    return StreamingResponse(
        body,
        media_type=samples.EXPORT_MEDIA[format],
        headers={"Content-Disposition": f'attachment; filename="embeddings-{dataset_id}.{format}"'},
    )


@router.get(
    "/{dataset_id}/map",
    responses={
        **ERRORS,
        **NOT_FITTED,
        200: {
            "description": "the 2-D (PCA) map of the current fit: format=binary (10 bytes a "
            "point, layout in docs/dashboard.md) or an Arrow IPC stream with sample IDs",
            "content": {"application/octet-stream": {}, ARROW_STREAM: {}},
        },
        304: {"description": "unchanged (If-None-Match)"},
    },
)
async def get_map(
    dataset_id: str, request: Request, ctx: Context, tenant: Tenant, format: Literal["binary", "arrow"] = "binary"
) -> Response:
    if format == "arrow":
        fit_id, stream = await run_in_threadpool(samples.map_arrow, ctx, tenant, dataset_id)
        return StreamingResponse(stream, media_type=ARROW_STREAM, headers={"X-Fit-Id": fit_id})
    packed = await run_in_threadpool(samples.packed_map, ctx, tenant, dataset_id)
    # The URL names the current fit, which changes: revalidate each time, send only when new.
    headers = {"ETag": f'"map-{packed.fit_id}"', "Cache-Control": "private, no-cache", "X-Fit-Id": packed.fit_id}
    if request.headers.get("if-none-match") == headers["ETag"]:
        return Response(status_code=304, headers=headers)
    return Response(packed.body, media_type="application/octet-stream", headers=headers)


@router.get(
    "/{dataset_id}/map/rows",
    response_model=schemas.MapRows,
    responses={**ERRORS, **NOT_FITTED, 413: {"description": "too many rows"}, 422: {"description": "bad rows"}},
)
def get_map_rows(
    dataset_id: str,
    ctx: Context,
    tenant: Tenant,
    rows: Annotated[str, Query(max_length=20000, pattern=r"^[0-9, ]*$", description="comma-separated row numbers of the map")],
) -> schemas.MapRows:
    return samples.map_rows(ctx, tenant, dataset_id, rows)


@router.get(
    "/{dataset_id}/samples/{sample_id:path}/thumbnail",
    response_class=Response,
    responses={
        **ERRORS,
        200: {"description": "a small JPEG (longer side 128 px)", "content": {MEDIA_TYPE: {}}},
        304: {"description": "unchanged (If-None-Match)"},
    },
)
def get_thumbnail(dataset_id: str, sample_id: str, request: Request, ctx: Context, tenant: Tenant) -> Response:
    data = samples.thumbnail(ctx, tenant, dataset_id, sample_id)
    # A sample's thumbnail never changes while its dataset exists; private: tenant data.
    headers = {"ETag": f'"{zlib.crc32(data):08x}-{len(data)}"', "Cache-Control": "private, max-age=86400"}
    if request.headers.get("if-none-match") == headers["ETag"]:
        return Response(status_code=304, headers=headers)
    return Response(data, media_type=MEDIA_TYPE, headers=headers)


@router.get(
    "/{dataset_id}/samples/{sample_id:path}",
    response_model=schemas.SampleDetail,
    responses={**ERRORS, **NOT_FITTED},
)
def get_sample(
    dataset_id: str,
    sample_id: str,
    ctx: Context,
    tenant: Tenant,
    k: Annotated[int, Query(ge=1, le=100, description="nearest neighbors to list")] = 10,
) -> schemas.SampleDetail:
    return samples.sample_detail(ctx, tenant, dataset_id, sample_id, k)
