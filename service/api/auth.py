"""API keys: ``Authorization: Bearer <key>``; each key belongs to one tenant."""

from __future__ import annotations

import hmac

from fastapi import Request

from service.api.errors import ApiError
from service.settings import ANONYMOUS_TENANT


def tenant_of(request: Request) -> str:
    """The caller's tenant; with no keys configured everyone is the one local tenant."""
    keys: dict[str, str] = request.app.state.ctx.settings.api_keys
    if not keys:
        return ANONYMOUS_TENANT
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    challenge = {"WWW-Authenticate": "Bearer"}
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "missing API key: send 'Authorization: Bearer <key>'", challenge)
    token = token.strip()
    for key, tenant in keys.items():
        if hmac.compare_digest(key.encode(), token.encode()):
            return tenant
    raise ApiError(401, "unknown API key", challenge)
