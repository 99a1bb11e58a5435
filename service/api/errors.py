"""Domain errors -> HTTP: one table, registered once on the app.

Every error is JSON ``{"detail": "<message>"}``. The table maps each branch of the domain error
tree (``service.errors``) to its status; the most specific class wins, so a package's own error
(``CursorError(BadRequest)``, ``JobConflict(Conflict)``) needs no entry of its own.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

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


def register(app: FastAPI) -> None:
    app.add_exception_handler(ServiceError, _handle)
