"""``difficulty serve``: run the API with uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from service.settings import Settings, SettingsError, load_settings

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def choose_host(requested: str | None, auth_enabled: bool) -> tuple[str, str | None]:
    """The bind address and, when it differs from the request, why."""
    if auth_enabled:
        return requested or "127.0.0.1", None
    if requested and requested not in LOOPBACK:
        return "127.0.0.1", (
            f"no API keys configured (DIFFICULTY_API_KEYS): refusing to listen on {requested}; "
            "listening on 127.0.0.1 only"
        )
    return requested or "127.0.0.1", "no API keys configured (DIFFICULTY_API_KEYS): listening on 127.0.0.1 only"


def serve_command(args: argparse.Namespace) -> int:
    import uvicorn

    from service.api.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(args.data_dir)
    except SettingsError as exc:
        print(f"difficulty serve: error: {exc}", file=sys.stderr)
        return 2
    host, note = choose_host(args.host, settings.auth_enabled)
    if note:
        print(f"difficulty serve: {note}", file=sys.stderr, flush=True)
    print(
        f"difficulty serve: data dir {settings.data_dir}; "
        f"{'in-process worker' if not args.no_worker else 'no worker (run `difficulty worker`)'}; "
        f"http://{host}:{args.port}",
        file=sys.stderr,
        flush=True,
    )
    app = create_app(settings, run_worker=not args.no_worker)
    uvicorn.run(app, host=host, port=args.port, log_level="info", access_log=False, **uvicorn_limits(settings))
    return 0


def uvicorn_limits(settings: Settings) -> dict[str, Any]:
    """The HTTP server's own limits (docs/security.md). Past ``limit_concurrency`` uvicorn
    answers 503 instead of queueing without end; idle keep-alive connections are closed after
    ``timeout_keep_alive``. The h11 parser is chosen on purpose: it refuses a request line and
    headers over ``h11_max_incomplete_event_size`` (400, connection closed), while httptools
    (uvicorn's choice when installed) has no such limit: it buffered 61 MiB of headers from one
    connection without answering (+62 MiB peak RSS)."""
    return {
        "http": "h11",
        "h11_max_incomplete_event_size": settings.http_max_header_bytes,
        "limit_concurrency": settings.http_max_connections,
        "timeout_keep_alive": settings.http_keep_alive_seconds,
    }
