"""API keys: ``Authorization: Bearer <key>``; each key belongs to one tenant.

``tenant_for`` is the one check: the request-limits middleware (``api.limits``) runs it before
any body is read, and the ``Tenant`` dependency (``tenant_of``) runs it again for the route.
"""

from __future__ import annotations

import hmac
import logging

from fastapi import Request

from service.errors import Unauthorized
from service.settings import ANONYMOUS_TENANT

log = logging.getLogger("service.auth")


def tenant_for(keys: dict[str, str], header: str, *, client: str = "?") -> str:
    """The tenant of an ``Authorization`` header value; with no keys, the one local tenant.

    A failed attempt is logged with the client address (never the key that was sent)."""
    if not keys:
        return ANONYMOUS_TENANT
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        log.warning("authentication failed from %s: no bearer key", client)
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    token = token.strip().encode("latin-1")  # the header's bytes (Starlette decodes them as latin-1)
    found = None
    for key, tenant in keys.items():
        # Compare against every key (no early exit): the time taken does not say which matched.
        if hmac.compare_digest(key.encode(), token):
            found = tenant
    if found is None:
        log.warning("authentication failed from %s: unknown API key", client)
        raise Unauthorized("unknown API key")
    return found


def tenant_of(request: Request) -> str:
    """The caller's tenant; with no keys configured everyone is the one local tenant."""
    client = request.client.host if request.client else "?"
    return tenant_for(request.app.state.ctx.settings.api_keys, request.headers.get("authorization", ""),
                      client=client)
