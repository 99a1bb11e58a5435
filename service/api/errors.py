"""Errors as JSON ``{"detail": ...}`` with the status code the caller's mistake deserves.

``ApiError`` is FastAPI's HTTPException (its default handler writes the body and headers); the
name marks errors raised by the service's own operations."""

from __future__ import annotations

from fastapi import HTTPException


class ApiError(HTTPException):
    def __init__(self, status_code: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(status_code=status_code, detail=detail, headers=headers)


def not_found(what: str = "dataset") -> ApiError:
    return ApiError(404, f"{what} not found")
