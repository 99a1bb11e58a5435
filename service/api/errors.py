"""Domain errors -> HTTP: one table, registered once on the app.

Every error is JSON ``{"detail": "<message>"}``; a request that does not match its schema gets
FastAPI's list (``{"detail": [{"loc", "msg", "type"}]}``, bounded). The OpenAPI document declares
exactly that shape for every error status (``_document_errors``). The table maps each branch of the domain error
tree (``service.errors``) to its status; the most specific class wins, so a package's own error
(``CursorError(BadRequest)``, ``JobConflict(Conflict)``) needs no entry of its own.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from service.api.limits import RequestTimeout
from service.errors import (
    BadRequest,
    Conflict,
    InsufficientStorage,
    InvalidInput,
    NotFound,
    ServiceError,
    TooLarge,
    Unauthorized,
    UnsupportedMediaType,
)

STATUS: dict[type[ServiceError], int] = {
    BadRequest: 400,
    Unauthorized: 401,
    NotFound: 404,
    Conflict: 409,
    TooLarge: 413,
    UnsupportedMediaType: 415,
    InvalidInput: 422,
    InsufficientStorage: 507,
    RequestTimeout: 408,
}
HEADERS: dict[type[ServiceError], dict[str, str]] = {Unauthorized: {"WWW-Authenticate": "Bearer"}}
MAX_DETAIL = 2000  # characters: a message never echoes a whole hostile input


def status_of(error: ServiceError) -> tuple[int, dict[str, str]]:
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls], HEADERS.get(cls, {})
    return 400, {}


async def _handle(request: Request, error: Exception) -> JSONResponse:
    assert isinstance(error, ServiceError)
    status, headers = status_of(error)
    return JSONResponse({"detail": str(error)[:MAX_DETAIL]}, status_code=status, headers=headers)


MAX_VALIDATION_ERRORS = 20
ERROR_SCHEMA = {
    "title": "Error",
    "type": "object",
    "required": ["detail"],
    "properties": {
        "detail": {
            "title": "Detail",
            "description": "a message (every error the service reports), or the list of invalid "
            "request fields (422 for a request that does not match its schema)",
            "anyOf": [
                {"type": "string", "maxLength": MAX_DETAIL},
                {"type": "array", "items": {"$ref": "#/components/schemas/ValidationError"},
                 "maxItems": MAX_VALIDATION_ERRORS},
            ],
        }
    },
}
STATUS_TEXT = {
    400: "malformed request (a request the HTTP server cannot parse gets its text/plain answer)", 401: "missing or unknown API key", 404: "not found", 409: "conflict",
    413: "over a configured limit", 415: "unsupported media type",
    421: "keyless local mode: the Host header must name localhost",
    422: "invalid input (a message) or a request that does not match its schema (a list)",
    503: "too many uploads in flight: retry after the Retry-After seconds",
    507: "the data directory is full",
    408: "the request body stalled (DIFFICULTY_BODY_IDLE_SECONDS)",
}


async def _handle_validation(request: Request, error: Exception) -> JSONResponse:
    # FastAPI's list shape, bounded: no echo of the input (a 10,000-character field came back
    # whole), at most MAX_VALIDATION_ERRORS entries, short messages.
    assert isinstance(error, RequestValidationError)
    detail = [
        {"type": str(e.get("type", ""))[:100], "loc": [x if isinstance(x, int) else str(x)[:100] for x in e.get("loc", ())][:10],
         "msg": str(e.get("msg", ""))[:500]}
        for e in error.errors()[:MAX_VALIDATION_ERRORS]
    ]
    return JSONResponse({"detail": detail}, status_code=422)


def _document_errors(app: FastAPI) -> None:
    """Declare the served error shape for every error status in the OpenAPI document (a
    generated client can then parse every error): ``{"detail": string | [ValidationError]}``,
    the same for domain errors, request-limit answers and schema validation. Every operation
    also lists the statuses any request can get (401 with keys, 413, 421, 422)."""
    build = app.openapi

    def openapi() -> dict:
        schema = build()
        schemas = schema.setdefault("components", {}).setdefault("schemas", {})
        if "Error" in schemas:
            return schema  # already done (the document is built once and cached)
        schemas["Error"] = ERROR_SCHEMA
        schemas.setdefault("ValidationError", {
            "title": "ValidationError", "type": "object", "required": ["loc", "msg", "type"],
            "properties": {"loc": {"type": "array", "items": {"anyOf": [{"type": "string"}, {"type": "integer"}]}},
                           "msg": {"type": "string"}, "type": {"type": "string"}},
        })
        schemas.pop("HTTPValidationError", None)
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                common = [400, 408, 413, 421, 422] + ([401] if path.startswith("/v1/") or path == "/metrics" else [])
                body = (operation.get("requestBody") or {}).get("content", {})
                if "multipart/form-data" in body:
                    common += [415, 503, 507]
                for status in common:
                    responses.setdefault(str(status), {"description": STATUS_TEXT[status]})
                for status, response in responses.items():
                    if status[0] in "45" and (path, status) != ("/readyz", "503"):  # that one is a Health
                        response["content"] = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
                        if status == "400":  # the HTTP server's own answer to an unparseable request
                            response["content"]["text/plain"] = {"schema": {"type": "string"}}
                        if response.get("description") == "Validation Error":
                            response["description"] = STATUS_TEXT[422]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def register(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _handle)
    app.add_exception_handler(RequestValidationError, _handle_validation)
    _document_errors(app)
