"""Hostile archives from the attacker's side: tar header bombs, uncounted directory entries, zip
central directories bigger than their limit, over-long or non-UTF-8 member names.

The memory findings are asserted on the real server process (peak RSS, ``VmHWM``); the rest
through the in-process app and the readers (the upload check and the readers share one rule).

Cost: one server start (~4 s) + building the archives (~2 s); the unit cases < 1 s.
"""

from __future__ import annotations

import gzip
import io
import struct
import tarfile
import zipfile
from pathlib import Path

import httpx
import pytest
from apiserver import running_server
from test_hostile_requests import RSS_BUDGET_KIB, peak_rss_kib, server_pid

from service.ingest import open_source
from service.ingest.safety import ArchiveError, inspect_archive
from service.ingest.sample import MAX_LABEL_LENGTH, MAX_SAMPLE_ID_LENGTH, MAX_TAR_HEADER_BYTES

KEYS = {"mallory": "mallory-key-0123456789"}
GOOD = {"cat/001.jpg": b"x", "dog/002.jpg": b"y"}


def tar_bytes(members: dict[str, bytes], extra: list[tarfile.TarInfo] = (), fmt: int = tarfile.GNU_FORMAT) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=fmt) as archive:
        for info in extra:
            archive.addfile(info)
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def long_name_bomb(path: Path, declared: int, kind: bytes = tarfile.GNUTYPE_LONGNAME) -> Path:
    """A tar.gz whose first header is a GNU long-name (or pax) header declaring ``declared``
    bytes of name, followed by that many bytes and one ordinary member: ~``declared``/1000 on disk."""
    header = tarfile.TarInfo("././@LongLink")
    header.type = kind
    header.size = declared
    with gzip.open(path, "wb", compresslevel=6) as out:
        out.write(header.tobuf(format=tarfile.GNU_FORMAT))
        piece = b"a" * (1 << 20)
        left = declared
        while left:
            out.write(piece[: min(left, len(piece))])
            left -= min(left, len(piece))
        out.write(b"\0" * (-declared % 512))
        member = tarfile.TarInfo("cat/001.jpg")
        member.size = 1
        out.write(member.tobuf(format=tarfile.GNU_FORMAT) + b"x" + b"\0" * 511 + b"\0" * 1024)
    return path


def zip_with_entries(count: int) -> bytes:
    """A stored zip of ``count`` empty entries, its central directory written by hand (zipfile
    takes ~10 s for 200,000 entries)."""
    local, central = io.BytesIO(), io.BytesIO()
    for i in range(count):
        name = f"d{i % 10}/{i:07d}.jpg".encode()
        offset = local.tell()
        local.write(struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, 0, 0, 0, 0, 0, 0, len(name), 0) + name)
        central.write(struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, 0, 0, 0, 0, 0, 0, len(name), 0, 0, 0, 0,
                                  0, offset) + name)
    directory = central.getvalue()
    entries = min(count, 0xFFFF)  # a plain record: the count wraps, the size still tells
    end = struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, entries, entries, len(directory), local.tell(), 0)
    return local.getvalue() + directory + end


@pytest.fixture(scope="module")
def hostile_server(tmp_path_factory: pytest.TempPathFactory):
    data_dir = tmp_path_factory.mktemp("archives") / "data"
    env = {"DIFFICULTY_MAX_ARCHIVE_MEMBERS": "10"}
    headers = {"Authorization": f"Bearer {KEYS['mallory']}"}
    with running_server(data_dir, api_keys=KEYS, with_worker=False, env=env) as url, httpx.Client(
        base_url=url, headers=headers, timeout=120
    ) as c:
        dataset_id = c.post("/v1/datasets", json={"name": "target", "encoder": "efficientnet-lite0"}).json()["id"]
        yield c, dataset_id, server_pid(data_dir.resolve())


def _upload(c: httpx.Client, dataset_id: str, name: str, content: bytes) -> httpx.Response:
    return c.post(f"/v1/datasets/{dataset_id}/items", files={"file": (name, content)})


def test_gnu_long_name_header_bomb_keeps_server_memory_flat(hostile_server, tmp_path):
    c, dataset_id, pid = hostile_server
    bomb = long_name_bomb(tmp_path / "bomb.tar.gz", 200 * 1024 * 1024)  # the audit's 200 MiB name
    assert bomb.stat().st_size < 2 * 1024 * 1024
    before = peak_rss_kib(pid)
    response = _upload(c, dataset_id, "bomb.tar.gz", bomb.read_bytes())
    grown = peak_rss_kib(pid) - before
    assert response.status_code == 422, response.text
    assert f"limit {MAX_TAR_HEADER_BYTES} bytes" in response.json()["detail"]
    assert grown < RSS_BUDGET_KIB, f"server peak RSS grew by {grown} KiB (budget {RSS_BUDGET_KIB} KiB)"
    # A pax header the same way.
    pax = long_name_bomb(tmp_path / "pax.tar.gz", 50 * 1024 * 1024, kind=tarfile.XHDTYPE)
    response = _upload(c, dataset_id, "pax.tar.gz", pax.read_bytes())
    assert response.status_code == 422 and "extension header" in response.json()["detail"], response.text
    assert peak_rss_kib(pid) - before < RSS_BUDGET_KIB


def test_directory_entries_count_against_the_member_limit(hostile_server):
    """200,000 directory entries were accepted with a limit of 10 (an 18 s scan)."""
    c, dataset_id, pid = hostile_server
    dirs = []
    for i in range(2000):
        info = tarfile.TarInfo(f"cat/d{i}")
        info.type = tarfile.DIRTYPE
        dirs.append(info)
    response = _upload(c, dataset_id, "dirs.tar.gz", tar_bytes(GOOD, dirs))
    assert response.status_code == 422, response.text
    assert "more than 10 entries" in response.json()["detail"]
    assert "directories" in response.json()["detail"]


def test_zip_central_directory_is_checked_before_it_is_parsed(hostile_server):
    c, dataset_id, pid = hostile_server
    many = zip_with_entries(200_000)  # ~18 MB, as in the audit
    before = peak_rss_kib(pid)
    response = _upload(c, dataset_id, "many.zip", many)
    assert response.status_code == 422, response.text
    assert "DIFFICULTY_MAX_ARCHIVE_MEMBERS" in response.json()["detail"]
    grown = peak_rss_kib(pid) - before
    # The upload itself is spooled to disk; parsing 200,000 ZipInfos cost +115 MB before.
    assert grown < RSS_BUDGET_KIB, f"server peak RSS grew by {grown} KiB (budget {RSS_BUDGET_KIB} KiB)"
    # Directories count in a zip too.
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for i in range(11):
            archive.writestr(f"cat/d{i}/", b"")
        archive.writestr("cat/001.jpg", b"x")
    response = _upload(c, dataset_id, "dirs.zip", buffer.getvalue())
    assert response.status_code == 422 and "entries" in response.json()["detail"], response.text


def test_lying_zip_directory_size_is_refused(tmp_path):
    """An end record that declares 3 entries over a 25 KB central directory of 400 (zipfile
    reads and parses all of it: it trusts the size, not the count)."""
    data = bytearray(zip_with_entries(400))
    end = data.rindex(b"PK\x05\x06")
    entries, size = 3, struct.unpack("<L", data[end + 12 : end + 16])[0]
    data[end + 8 : end + 12] = struct.pack("<2H", entries, entries)
    path = tmp_path / "lie.zip"
    path.write_bytes(bytes(data))
    with pytest.raises(ArchiveError, match=f"central directory is {size} bytes for 3 entries"):
        inspect_archive(path, max_members=1000)


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_long_and_non_utf8_names_are_refused_by_check_and_readers_alike(tmp_path, kind):
    cases = {
        "long id": "cat/" + "a" * MAX_SAMPLE_ID_LENGTH + ".jpg",
        "long class": "c" * (MAX_LABEL_LENGTH + 1) + "/001.jpg",
    }
    if kind == "tar":
        # tar decodes undecodable name bytes to lone surrogates (zip decodes as cp437: valid).
        cases["non-utf8"] = b"caf\xe9/001.jpg".decode("utf-8", "surrogateescape")
    for what, name in cases.items():
        path = tmp_path / f"{what.replace(' ', '-')}.{kind}"
        if kind == "zip":
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w") as archive:
                for good, data in GOOD.items():
                    archive.writestr(good, data)
                archive.writestr(name, b"z")
            path.write_bytes(buffer.getvalue())
        else:
            info = tarfile.TarInfo(name)
            info.size = 1
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT,
                              encoding="utf-8", errors="surrogateescape") as archive:
                for good, data in GOOD.items():
                    member = tarfile.TarInfo(good)
                    member.size = len(data)
                    archive.addfile(member, io.BytesIO(data))
                archive.addfile(info, io.BytesIO(b"z"))
            path.write_bytes(buffer.getvalue())
        with pytest.raises(ArchiveError, match="limit|UTF-8"):
            inspect_archive(path)
        # The readers agree: the member is a listed failure, never a sample with that ID.
        samples = list(open_source(path))
        bad = [s for s in samples if s.error is not None]
        assert len(bad) == 1, (what, [s.sample_id[:40] for s in samples])
        assert all(s.sample_id.encode("utf-8") for s in samples)
        assert all(len(s.sample_id) <= MAX_SAMPLE_ID_LENGTH for s in samples)


def test_non_utf8_member_name_cannot_break_the_dataset(api_client):
    """Before: committed, then GET /v1/datasets and GET /v1/datasets/{id} answered 500 for good."""
    dataset_id = api_client.post("/v1/datasets", json={"name": "x", "encoder": "efficientnet-lite0"}).json()["id"]
    name = b"caf\xe9/001.jpg".decode("utf-8", "surrogateescape")
    info = tarfile.TarInfo(name)
    info.size = 1
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as archive:
        archive.addfile(info, io.BytesIO(b"z"))
    response = api_client.post(f"/v1/datasets/{dataset_id}/items", files={"file": ("x.tar", buffer.getvalue())})
    assert response.status_code == 422 and "UTF-8" in response.json()["detail"], response.text
    assert api_client.get("/v1/datasets").status_code == 200
    assert api_client.get(f"/v1/datasets/{dataset_id}").status_code == 200


def test_a_chunk_is_bounded_by_bytes_as_well_as_rows(tmp_path):
    """1024 rows x 64 MiB members could be gathered before decoding: a chunk now also ends at
    MAX_CHUNK_BYTES of encoded bytes (256 MiB: 8 members of 32 MiB per chunk)."""
    from service.ingest.sample import MAX_ITEM_BYTES, Sample
    from service.pipeline.embedding import MAX_CHUNK_BYTES, EmbedReport, chunks_to_embed
    from service.storage.embeddings import EmbeddingStore

    assert MAX_ITEM_BYTES <= 32 * 1024 * 1024
    member = bytes(MAX_ITEM_BYTES)  # one shared buffer: the test itself stays small
    samples = [Sample(f"cat/{i}.jpg", "cat", data=member) for i in range(24)]
    chunks = [len(rows) for rows, _ in chunks_to_embed(samples, EmbeddingStore(tmp_path / "store"), 1024,
                                                      EmbedReport(), lambda n: None)]
    assert sum(chunks) == 24
    per_chunk = -(-MAX_CHUNK_BYTES // MAX_ITEM_BYTES)
    assert chunks == [per_chunk] * (24 // per_chunk) + ([24 % per_chunk] if 24 % per_chunk else [])
