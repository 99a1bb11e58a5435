"""``difficulty serve``: run the API with uvicorn."""

from __future__ import annotations

import argparse
import logging
import sys

from service.settings import SettingsError, load_settings

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
    # Bounded connections: past the limit uvicorn answers 503 instead of queueing without end,
    # and idle keep-alive connections are closed after 5 s (uvicorn's default, stated here).
    uvicorn.run(app, host=host, port=args.port, log_level="info", access_log=False,
                limit_concurrency=1000, timeout_keep_alive=5)
    return 0
