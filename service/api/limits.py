"""Request limits applied before any route runs (an ASGI middleware, outermost after Starlette's
error handler).

For every HTTP request, in this order:

1. Keyless local mode (no API keys) on a loopback socket: the ``Host`` header must name the
   loopback (``localhost``, ``*.localhost``, ``127.0.0.1``, ``[::1]``). A web page that rebinds
   its own DNS name to 127.0.0.1 (DNS rebinding) sends its own name and gets 421, so it can
   neither read nor delete the local user's data.
2. With API keys, a ``/v1/`` request without a valid key is answered 401 here, before its body
   reaches any route (FastAPI reads a JSON body before it resolves the route's dependencies);
   at most DRAIN_BYTES of it are read and dropped first, then the connection is closed.
   The route's ``Tenant`` dependency checks the same key again (``auth.tenant_for``).
3. Bodies: the three multipart upload routes stream their bodies to disk under their own limit
   (``api.multipart``, DIFFICULTY_MAX_UPLOAD_BYTES). Every other body is read here, at most
   ``max_request_bytes`` of it (DIFFICULTY_MAX_REQUEST_BYTES): a larger declared
   ``Content-Length`` is refused at once, a chunked body as soon as it passes the limit, and the
   route gets the buffered body replayed. Memory per request is bounded by the limit.
4. Slow clients: a body that sends nothing for DIFFICULTY_BODY_IDLE_SECONDS is refused (408;
   an upload's spool is removed). Uploads in flight are capped per process and per tenant
   (503 with Retry-After), so one tenant cannot hold every connection and spool.
5. ``/metrics`` needs a key too when keys are set, unless DIFFICULTY_METRICS_PUBLIC=1.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.api.auth import tenant_for
from service.errors import BadRequest, Unauthorized
from service.settings import ANONYMOUS_TENANT, Settings

# POST routes whose multipart bodies api.multipart streams to disk under the upload limit.
UPLOAD_ROUTES = re.compile(r"^/v1/datasets/[^/]+/(items|embeddings|score)$")
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
LOOPBACK_ADDRESSES = frozenset({"127.0.0.1", "::1"})


def host_name(header: str) -> str:
    """``Host`` header -> lower-case host name without port (``[::1]:8000`` -> ``::1``)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


def is_loopback_name(name: str) -> bool:
    if name in LOOPBACK_HOSTS or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback  # 127.0.0.2 yes; 127.evil.example no
    except ValueError:
        return False


class RequestLimits:
    """The checks above; ``settings`` are the app's (keys and limits are read per request)."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self._uploads: dict[str, int] = {}  # uploads in flight per tenant

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path: str = scope.get("path", "")
        keys = self.settings.api_keys
        if not keys and _on_loopback(scope) and not is_loopback_name(host_name(headers.get("host", ""))):
            await _answer(send, 421, "keyless local mode answers only requests addressed to localhost "
                                     "(Host header); set DIFFICULTY_API_KEYS to serve other host names", drain=receive)
            return
        if "\x00" in path or b"%00" in scope.get("query_string", b""):
            # No ID, label or cursor of ours holds NUL, and PostgreSQL cannot even compare one.
            await _answer(send, 400, "NUL in the request path or query", drain=receive)
            return
        tenant = ANONYMOUS_TENANT
        if keys and (path.startswith("/v1/") or (path == "/metrics" and not self.settings.metrics_public)):
            client = scope.get("client") or ("?", 0)
            try:
                tenant = tenant_for(keys, headers.get("authorization", ""), client=str(client[0]))
            except Unauthorized as exc:
                await _answer(send, 401, str(exc), {"www-authenticate": "Bearer"}, drain=receive)
                return
        idle = self.settings.body_idle_seconds
        if scope.get("method") == "POST" and UPLOAD_ROUTES.match(path):
            await self._upload(scope, _idle_bounded(receive, idle), send, tenant)
            return
        limit = self.settings.max_request_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _answer(send, 413, _too_large(limit), drain=receive)
            return
        body = bytearray()
        bounded = _idle_bounded(receive, idle)
        while True:
            try:
                message = await bounded()
            except RequestTimeout as exc:
                await _answer(send, 408, str(exc))
                return
            if message["type"] == "http.disconnect":
                return  # the client left: nothing to answer
            body += message.get("body", b"")
            if len(body) > limit:
                await _answer(send, 413, _too_large(limit), drain=bounded)
                return
            if not message.get("more_body", False):
                break
        await self.app(scope, _replay(bytes(body), receive), send)

    async def _upload(self, scope: Scope, receive: Receive, send: Send, tenant: str) -> None:
        """An upload holds a spool file and a connection for as long as it streams: at most
        DIFFICULTY_MAX_CONCURRENT_UPLOADS at once per process, DIFFICULTY_MAX_UPLOADS_PER_TENANT
        of them one tenant's (one event loop per process: plain counters suffice)."""
        total, mine = sum(self._uploads.values()), self._uploads.get(tenant, 0)
        if total >= self.settings.max_concurrent_uploads or mine >= self.settings.max_uploads_per_tenant:
            which = ("DIFFICULTY_MAX_UPLOADS_PER_TENANT" if mine >= self.settings.max_uploads_per_tenant
                     else "DIFFICULTY_MAX_CONCURRENT_UPLOADS")
            await _answer(send, 503, f"too many uploads in flight ({which}); retry shortly", {"retry-after": "5"},
                          drain=receive)
            return
        self._uploads[tenant] = mine + 1
        try:
            await self.app(scope, receive, send)
        finally:
            self._uploads[tenant] -= 1
            if not self._uploads[tenant]:
                del self._uploads[tenant]


class RequestTimeout(BadRequest):
    """The client sent no body bytes for DIFFICULTY_BODY_IDLE_SECONDS (408)."""


def _idle_bounded(receive: Receive, idle: float) -> Receive:
    # A client that stops sending (slow upload, slow loris) is cut off after ``idle`` seconds of
    # silence instead of holding its spool file and connection forever.
    async def bounded() -> Message:
        try:
            return await asyncio.wait_for(receive(), timeout=idle) if idle > 0 else await receive()
        except TimeoutError:
            raise RequestTimeout(
                f"the request body sent nothing for {idle:g} s (DIFFICULTY_BODY_IDLE_SECONDS)"
            ) from None

    return bounded


def _on_loopback(scope: Scope) -> bool:
    # The socket the request arrived on (uvicorn: the local address). In-process test clients
    # have no socket; a server bound to a public address is not the rebinding target.
    server = scope.get("server")
    return bool(server) and str(server[0]) in LOOPBACK_ADDRESSES


def _too_large(limit: int) -> str:
    return f"request body exceeds the limit of {limit} bytes (DIFFICULTY_MAX_REQUEST_BYTES)"


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # afterwards: the client's disconnect, as the server reports it

    return replay


# A refused request's body is read and dropped up to this many bytes before the answer: a
# client still sending a modest body then reads the answer instead of a connection reset. An
# attack's body beyond it is never read (the connection is closed).
DRAIN_BYTES = 1024 * 1024


async def _drain(receive: Receive) -> None:
    seen = 0
    while seen <= DRAIN_BYTES:
        try:
            message = await asyncio.wait_for(receive(), timeout=5)
        except (TimeoutError, RequestTimeout):
            return
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


async def _answer(
    send: Send, status: int, detail: str, extra: dict[str, str] | None = None, *, drain: Receive | None = None
) -> None:
    if drain is not None:
        await _drain(drain)
    payload = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    # The client may still be sending: tell it (and the server) the connection ends here.
    headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
