"""Hostile requests against the real server (uvicorn subprocess): bodies are bounded and the key
is checked before a body is read; keyless local mode only answers loopback host names.

Memory is asserted on the server process: the peak resident set (``VmHWM`` in
/proc/<pid>/status) may grow by at most ``RSS_BUDGET_KIB`` while the attack runs. Before the
request limits the 96 MiB unauthenticated body below was read whole (about +274 MB peak).

Cost: one server start (~4 s) per module fixture, two fixtures; each attack < 1 s.
"""

from __future__ import annotations

import select
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from apiserver import running_server

KEYS = {"alice": "alice-key-0123456789"}
ATTACK_BYTES = 96 * 1024 * 1024  # what the audit sent
RSS_BUDGET_KIB = 32 * 1024  # growth of the server's peak RSS allowed during one attack


def server_pid(data_dir: Path) -> int:
    """The pid of `python -m service.cli serve ... --data-dir <data_dir>` (one per test)."""
    wanted = str(data_dir)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        args = [a.decode(errors="replace") for a in argv]
        if "serve" in args and "--data-dir" in args and args[args.index("--data-dir") + 1] == wanted:
            return int(entry.name)
    raise LookupError(f"no server process for {data_dir}")


def peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise LookupError("VmHWM missing")


def send_body(url: str, head: str, total: int, *, chunked: bool = False) -> tuple[int, str, int]:
    """Send ``head`` and up to ``total`` body bytes in 1 MiB pieces, stopping as soon as the
    server answers (an attacker does not wait). -> (status, response text, body bytes sent)."""
    host, port = url.removeprefix("http://").split(":")
    piece = b"x" * (1 << 20)
    sent = 0
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode())
        while sent < total:
            readable, _, _ = select.select([sock], [], [], 0)
            if readable:
                break
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
        if sent >= total and chunked:
            sock.sendall(b"0\r\n\r\n")
        sock.settimeout(30)
        response = b""
        try:  # the server closes the connection after its answer
            while data := sock.recv(65536):
                response += data
        except ConnectionResetError:
            pass
    status_line = response.split(b"\r\n", 1)[0].decode()
    return int(status_line.split()[1]), response.decode(errors="replace"), sent


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    data_dir = tmp_path_factory.mktemp("keyed") / "data"
    with running_server(data_dir, api_keys=KEYS, with_worker=False) as url:
        yield url, server_pid(data_dir.resolve())


def _json_head(url: str, length: int | None, auth: bool) -> str:
    host = url.removeprefix("http://")
    lines = ["POST /v1/datasets HTTP/1.1", f"Host: {host}", "Content-Type: application/json"]
    lines.append(f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked")
    if auth:
        lines.append(f"Authorization: Bearer {KEYS['alice']}")
    return "\r\n".join(lines) + "\r\n\r\n"


def test_unauthenticated_body_is_not_read(keyed):
    url, pid = keyed
    before = peak_rss_kib(pid)
    status, text, sent = send_body(url, _json_head(url, ATTACK_BYTES, auth=False), ATTACK_BYTES)
    assert status == 401, text
    assert '"detail"' in text and "www-authenticate: bearer" in text.lower()
    grown = peak_rss_kib(pid) - before
    assert grown < RSS_BUDGET_KIB, f"server peak RSS grew by {grown} KiB (budget {RSS_BUDGET_KIB} KiB)"
    # Chunked (no Content-Length): refused before the body too.
    status, text, _ = send_body(url, _json_head(url, None, auth=False), ATTACK_BYTES, chunked=True)
    assert status == 401, text
    assert peak_rss_kib(pid) - before < RSS_BUDGET_KIB


def test_authenticated_body_is_capped_while_streaming(keyed):
    url, pid = keyed
    before = peak_rss_kib(pid)
    status, text, _ = send_body(url, _json_head(url, ATTACK_BYTES, auth=True), ATTACK_BYTES)
    assert status == 413 and "DIFFICULTY_MAX_REQUEST_BYTES" in text, text
    # No Content-Length: the limit is counted as the chunks arrive.
    status, text, sent = send_body(url, _json_head(url, None, auth=True), ATTACK_BYTES, chunked=True)
    assert status == 413 and "65536 bytes" in text, text
    assert sent < ATTACK_BYTES  # answered long before the attacker finished
    grown = peak_rss_kib(pid) - before
    assert grown < RSS_BUDGET_KIB, f"server peak RSS grew by {grown} KiB (budget {RSS_BUDGET_KIB} KiB)"
    # Ordinary requests still work on the same server.
    headers = {"Authorization": f"Bearer {KEYS['alice']}"}
    created = httpx.post(url + "/v1/datasets", json={"name": "ok", "encoder": "feats"}, headers=headers)
    assert created.status_code == 201, created.text
    wrong = httpx.get(url + "/v1/datasets", headers={"Authorization": "Bearer not-a-key"})
    assert wrong.status_code == 401 and wrong.json()["detail"] == "unknown API key"


def test_keyless_local_mode_refuses_foreign_host_names(tmp_path):
    """DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 sends
    ``Host: evil.example``; the keyless server must not answer it."""
    with running_server(tmp_path / "data", with_worker=False) as url:
        port = url.rsplit(":", 1)[1]
        for host in ("evil.example", f"evil.example:{port}", "127.evil.example", "localhost.evil.example"):
            response = httpx.get(url + "/v1/datasets", headers={"Host": host})
            assert response.status_code == 421, (host, response.text)
            assert "Host" in response.json()["detail"]
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", "localhost", f"app.localhost:{port}"):
            assert httpx.get(url + "/v1/datasets", headers={"Host": host}).status_code == 200, host
        deleted = httpx.delete(url + "/v1/datasets/anything", headers={"Host": "evil.example"})
        assert deleted.status_code == 421


def test_small_json_bodies_and_uploads_still_pass(api_client):
    """In process: the limit applies to JSON, not to the streamed multipart uploads."""
    created = api_client.post("/v1/datasets", json={"name": "x" * 200, "encoder": "feats"})
    assert created.status_code == 201
    too_big = api_client.post("/v1/datasets", content=b"{" + b" " * (70 * 1024) + b"}",
                              headers={"content-type": "application/json"})
    assert too_big.status_code == 413 and "DIFFICULTY_MAX_REQUEST_BYTES" in too_big.json()["detail"]
    # An upload above 64 KiB is not capped by the JSON limit.
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, np.random.default_rng(0).normal(size=(300, 64)).astype(np.float32))  # 77 KB
    labels = "\n".join("ab"[i % 2] for i in range(300))
    upload = api_client.post(f"/v1/datasets/{created.json()['id']}/embeddings",
                             files={"embeddings": ("e.npy", buffer.getvalue()), "labels": ("l", labels)})
    assert upload.status_code == 201, upload.text



SLOW_ENV = {"DIFFICULTY_BODY_IDLE_SECONDS": "1", "DIFFICULTY_MAX_UPLOADS_PER_TENANT": "2"}
SLOW_KEYS = {"alice": "alice-key-0123456789", "bob": "bob-key-0123456789abc"}


def _stalled_upload(url: str, dataset_id: str, key: str) -> socket.socket:
    """An upload that declares 1 MB, sends 100 bytes of it and then nothing (slow loris)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = (f"POST /v1/datasets/{dataset_id}/embeddings HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: multipart/form-data; boundary=zz\r\n"
            "Content-Length: 1000000\r\n\r\n")
    sock.sendall(head.encode() + b"--zz\r\nContent-Disposition: form-data; name=\"embeddings\"\r\n\r\n" + b"x" * 40)
    return sock


def _answer_of(sock: socket.socket) -> int:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    sock.close()
    return int(data.split(b" ", 2)[1]) if data else 0


def test_slow_uploads_are_cut_off_and_capped_per_tenant(tmp_path):
    data_dir = tmp_path / "data"
    with running_server(data_dir, api_keys=SLOW_KEYS, with_worker=False, env=SLOW_ENV) as url:
        alice = {"Authorization": f"Bearer {SLOW_KEYS['alice']}"}
        bob = {"Authorization": f"Bearer {SLOW_KEYS['bob']}"}
        dataset_id = httpx.post(url + "/v1/datasets", json={"name": "a", "encoder": "feats"}, headers=alice).json()["id"]
        bobs = httpx.post(url + "/v1/datasets", json={"name": "b", "encoder": "feats"}, headers=bob).json()["id"]
        stalled = [_stalled_upload(url, dataset_id, SLOW_KEYS["alice"]) for _ in range(2)]
        # Both are in flight (the server answered neither yet): alice's third upload is refused...
        third = None
        for _ in range(50):
            third = httpx.post(f"{url}/v1/datasets/{dataset_id}/embeddings", headers=alice, files={"labels": ("l", b"a")})
            if third.status_code == 503:
                break
        assert third is not None and third.status_code == 503, third.text
        assert third.headers["retry-after"] == "5" and "DIFFICULTY_MAX_UPLOADS_PER_TENANT" in third.json()["detail"]
        # ...bob's is not (his own uploads are not in flight).
        other = httpx.post(f"{url}/v1/datasets/{bobs}/embeddings", headers=bob, files={"labels": ("l", b"a")})
        assert other.status_code == 422, other.text
        # The stalled ones are cut off after DIFFICULTY_BODY_IDLE_SECONDS of silence, spools removed.
        assert [_answer_of(s) for s in stalled] == [408, 408]
        assert list((data_dir / "tmp").glob("upload-*")) == []
        after = httpx.post(f"{url}/v1/datasets/{dataset_id}/embeddings", headers=alice, files={"labels": ("l", b"a")})
        assert after.status_code == 422, after.text
        # A stalled JSON body too.
        host, port = url.removeprefix("http://").split(":")
        sock = socket.create_connection((host, int(port)), timeout=30)
        sock.sendall(f"POST /v1/datasets HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {SLOW_KEYS['alice']}"
                     "\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"na".encode())
        assert _answer_of(sock) == 408


def test_metrics_need_a_key_when_keys_are_set(keyed):
    url, _ = keyed
    assert httpx.get(url + "/metrics").status_code == 401
    assert httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEYS['alice']}"}).status_code == 200
    assert httpx.get(url + "/healthz").status_code == 200  # probes stay open


def send_headers(url: str, total: int) -> tuple[bytes, int]:
    """Send a request line and ``total`` bytes of headers in 16 KiB lines, never ending them,
    stopping as soon as the server answers or closes. -> (what it answered, bytes sent)."""
    host, port = url.removeprefix("http://").split(":")
    line = b"X-Padding: " + b"a" * (16 * 1024 - 13) + b"\r\n"
    sent = 0
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: {host}\r\n".encode())
        try:
            while sent < total:
                readable, _, _ = select.select([sock], [], [], 0)
                if readable:
                    break
                sock.sendall(line)
                sent += len(line)
            sock.settimeout(10)
            return sock.recv(4096), sent
        except (ConnectionResetError, BrokenPipeError):
            return b"", sent


def test_oversized_headers_are_refused_and_not_buffered(keyed):
    """64 MiB of headers on one connection. Before (uvicorn's httptools parser, no header limit):
    all of it was buffered without an answer, +62 MiB peak RSS; now the h11 parser refuses past
    DIFFICULTY_HTTP_MAX_HEADER_BYTES (64 KiB) with a 400 and closes the connection."""
    url, pid = keyed
    before = peak_rss_kib(pid)
    answer, sent = send_headers(url, 64 * 1024 * 1024)
    assert sent < 64 * 1024 * 1024, "the server read every header byte"
    assert answer == b"" or answer.startswith(b"HTTP/1.1 400"), answer[:200]
    grown = peak_rss_kib(pid) - before
    assert grown < RSS_BUDGET_KIB, f"server peak RSS grew by {grown} KiB (budget {RSS_BUDGET_KIB} KiB)"
    assert httpx.get(url + "/healthz").status_code == 200
