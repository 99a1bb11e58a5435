"""API keys: ``Authorization: Bearer <key>``; each key belongs to one tenant."""

from __future__ import annotations

import hmac

from fastapi import Request

from service.errors import Unauthorized
from service.settings import ANONYMOUS_TENANT


def tenant_of(request: Request) -> str:
    """The caller's tenant; with no keys configured everyone is the one local tenant."""
    keys: dict[str, str] = request.app.state.ctx.settings.api_keys
    if not keys:
        return ANONYMOUS_TENANT
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    token = token.strip()
    for key, tenant in keys.items():
        if hmac.compare_digest(key.encode(), token.encode()):
            return tenant
    raise Unauthorized("unknown API key")
