"""Streaming multipart/form-data: file parts go straight to files under the data dir.

Starlette's ``request.form()`` spools large parts to the system temp dir (outside the data dir)
and has no total-size limit; this reader writes each part to ``dest/<field>`` as the bytes
arrive, counts them against ``max_bytes`` and never holds a part in memory.
"""

from __future__ import annotations

import errno
from pathlib import Path
from typing import BinaryIO

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from service.errors import (
    BadRequest,
    InsufficientStorage,
    InvalidInput,
    ServiceError,
    TooLarge,
    UnsupportedMediaType,
)
from service.usecases.forms import Form

MAX_TEXT_FIELD_BYTES = 64 * 1024
MAX_BOUNDARY_BYTES = 200


async def receive_form(
    request: Request, dest: Path, *, max_bytes: int, file_fields: set[str], text_fields: set[str] = frozenset()
) -> Form:
    """Parse the request body into ``dest`` (created here; removed again on any error)."""
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or not params.get(b"boundary"):
        raise UnsupportedMediaType("send multipart/form-data (e.g. curl -F file=@data.zip)")
    if len(params[b"boundary"]) > MAX_BOUNDARY_BYTES:
        # RFC 2046 allows 70; the parser refuses more than 256 (a 500 and a spool folder left
        # behind when it was first met inside the spool's setup).
        raise BadRequest(f"multipart boundary is longer than {MAX_BOUNDARY_BYTES} bytes")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise TooLarge(f"upload of {declared} bytes exceeds the limit of {max_bytes} bytes (DIFFICULTY_MAX_UPLOAD_BYTES)")
    dest.mkdir(parents=True, exist_ok=False)
    form = Form(dest)
    state: dict[str, object] = {"name": None, "fh": None, "text": None, "header": b"", "value": b""}
    headers: dict[bytes, bytes] = {}

    def on_part_begin() -> None:
        headers.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["header"] = bytes(state["header"]) + data[start:end]  # type: ignore[arg-type]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] = bytes(state["value"]) + data[start:end]  # type: ignore[arg-type]

    def on_header_end() -> None:
        headers[bytes(state["header"]).lower()] = bytes(state["value"])  # type: ignore[arg-type]
        state["header"], state["value"] = b"", b""

    def on_headers_finished() -> None:
        _, disposition = parse_options_header(headers.get(b"content-disposition", b""))
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        state["name"], state["fh"], state["text"] = name, None, None
        if name in file_fields:
            if name in form.files:
                raise InvalidInput(f"field {name!r} was sent twice")
            path = dest / name
            state["fh"] = open(path, "wb")  # noqa: SIM115 - closed in on_part_end / cleanup
            form.files[name] = path
        elif name in text_fields:
            state["text"] = bytearray()

    def on_part_data(data: bytes, start: int, end: int) -> None:
        fh = state["fh"]
        if fh is not None:
            fh.write(data[start:end])  # type: ignore[union-attr]
        elif state["text"] is not None:
            text: bytearray = state["text"]  # type: ignore[assignment]
            text += data[start:end]
            if len(text) > MAX_TEXT_FIELD_BYTES:
                raise TooLarge(f"form field {state['name']!r} is longer than {MAX_TEXT_FIELD_BYTES} bytes")

    def on_part_end() -> None:
        fh: BinaryIO | None = state["fh"]  # type: ignore[assignment]
        if fh is not None:
            fh.close()
        elif state["text"] is not None:
            try:
                form.fields[str(state["name"])] = bytes(state["text"]).decode("utf-8")  # type: ignore[arg-type]
            except UnicodeDecodeError:
                raise InvalidInput(f"form field {state['name']!r} is not UTF-8") from None
        state["fh"], state["text"] = None, None

    try:
        parser = MultipartParser(
            params[b"boundary"],
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
                "on_part_end": on_part_end,
            },
        )
    except Exception as exc:
        form.discard()
        raise BadRequest(f"malformed multipart header: {exc}") from None
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > max_bytes:
                raise TooLarge(f"upload exceeds the limit of {max_bytes} bytes (DIFFICULTY_MAX_UPLOAD_BYTES)")
            parser.write(chunk)
        parser.finalize()
    except ServiceError:
        _close(state)
        form.discard()
        raise
    except OSError as exc:
        _close(state)
        form.discard()
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise InsufficientStorage("the data directory is full: the upload was not stored") from None
        raise
    except Exception as exc:  # malformed multipart bodies raise several parser error types
        _close(state)
        form.discard()
        raise BadRequest(f"malformed multipart body: {exc}") from None
    _close(state)
    return form


def _close(state: dict[str, object]) -> None:
    fh = state.get("fh")
    if fh is not None:
        fh.close()  # type: ignore[union-attr]
