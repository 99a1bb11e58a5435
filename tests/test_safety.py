"""Archive uploads: hostile archives are refused (unit and through HTTP), real images are fitted."""

from __future__ import annotations

import contextlib
import io
import stat
import tarfile
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pyarrow as pa
import pytest
from apiserver import database_for, running_server, wait_for_job
from imagedata import COLOURS, jpeg_bytes, png_bytes
from PIL import Image

from service.ingest import open_source
from service.ingest.safety import ArchiveError, inspect_archive


def image_members(per_class: int = 4) -> dict[str, bytes]:
    out = {}
    for c, (name, rgb) in enumerate(sorted(COLOURS.items())):
        for i in range(per_class):
            jpeg = jpeg_bytes(rgb, 40, seed=10 * c + i)
            if i % 2:
                out[f"{name}/{i:03d}.png"] = png_bytes(Image.open(io.BytesIO(jpeg)))
            else:
                out[f"{name}/{i:03d}.jpeg"] = jpeg
    return out


def make_zip(members: dict[str, bytes], infos: list[zipfile.ZipInfo] = ()) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        for info in infos:
            archive.writestr(info, b"payload")
    return buffer.getvalue()


def make_tar(members: dict[str, bytes], extra: list[tarfile.TarInfo] = (), mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for info in extra:
            archive.addfile(info)
    return buffer.getvalue()


def tar_special(name: str, kind: bytes, target: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    return info


def zip_info(name: str, mode: int) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = mode << 16
    return info


GOOD = {"cat/001.jpg": b"x", "dog/002.jpg": b"y"}
HOSTILE = {
    "zip absolute path": make_zip(GOOD | {"/etc/evil.jpg": b"z"}),
    "zip dot-dot": make_zip(GOOD | {"cat/../../evil.jpg": b"z"}),
    "zip symlink": make_zip(GOOD, [zip_info("cat/link.jpg", stat.S_IFLNK | 0o777)]),
    "zip device": make_zip(GOOD, [zip_info("cat/dev.jpg", stat.S_IFCHR | 0o644)]),
    "zip duplicate": make_zip(GOOD, [zip_info("cat/001.jpg", stat.S_IFREG | 0o644)]),
    "zip bomb": make_zip(GOOD | {"cat/bomb.jpg": bytes(20_000_000)}),
    "tar absolute path": make_tar(GOOD | {"/abs/evil.jpg": b"z"}),
    "tar dot-dot": make_tar(GOOD | {"../evil.jpg": b"z"}),
    "tar symlink": make_tar(GOOD, [tar_special("cat/link.jpg", tarfile.SYMTYPE, "/etc/passwd")]),
    "tar hardlink": make_tar(GOOD, [tar_special("cat/hard.jpg", tarfile.LNKTYPE, "cat/001.jpg")]),
    "tar char device": make_tar(GOOD, [tar_special("cat/dev.jpg", tarfile.CHRTYPE)]),
    "tar block device": make_tar(GOOD, [tar_special("cat/blk.jpg", tarfile.BLKTYPE)]),
    "tar fifo": make_tar(GOOD, [tar_special("cat/fifo.jpg", tarfile.FIFOTYPE)]),
    "tar.gz bomb": make_tar(GOOD | {"cat/bomb.jpg": bytes(20_000_000)}),
    "too many members": make_zip({f"cat/{i:04d}.jpg": b"x" for i in range(60)}),
    "not an archive": b"this is not an archive at all" * 10,
    "an image, not an archive": png_bytes(Image.new("RGB", (40, 40), (1, 2, 3))),
    "empty zip": make_zip({}),
    "empty tar": make_tar({}, mode="w"),
    "only top-level files": make_zip({"001.jpg": b"x"}),
    "truncated tar.gz": make_tar(GOOD | {"cat/big.jpg": np.random.default_rng(0).bytes(100_000)})[:5000],
}
LIMITS = {"max_members": 50, "max_total_bytes": 5_000_000}


@pytest.mark.parametrize("kind", sorted(HOSTILE))
def test_hostile_archives_are_refused(kind, tmp_path):
    path = tmp_path / "upload"
    path.write_bytes(HOSTILE[kind])
    with pytest.raises(ArchiveError):
        inspect_archive(path, **LIMITS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["upload"]  # nothing extracted


@pytest.mark.parametrize("maker", [make_zip, make_tar, lambda m: make_tar(m, mode="w")])
def test_valid_archives_list_their_members(maker, tmp_path):
    members = image_members(2) | {"./blue/extra.jpg": b"z", ".hidden/x.jpg": b"h", "__MACOSX/red/._0.jpg": b"m",
                                   "red/Thumbs.db": b"t", "red/.DS_Store": b"d"}
    path = tmp_path / "upload"
    path.write_bytes(maker(members))
    found = inspect_archive(path, **LIMITS)
    assert sorted(m.name for m in found) == sorted([*image_members(2), "blue/extra.jpg"])
    assert {m.label for m in found} == set(COLOURS)
    # The upload's view of the samples is the readers' view: same names, nothing extra.
    assert sorted(m.name for m in found) == sorted(s.sample_id for s in open_source(path))


@contextlib.contextmanager
def _serve(kind: str, tmp_path_factory):
    data_dir = tmp_path_factory.mktemp(f"safety-{kind}") / "data"
    env = {
        "DIFFICULTY_MAX_UPLOAD_BYTES": "3000000",
        "DIFFICULTY_MAX_ARCHIVE_BYTES": str(LIMITS["max_total_bytes"]),
        "DIFFICULTY_MAX_ARCHIVE_MEMBERS": str(LIMITS["max_members"]),
        "DIFFICULTY_IMAGE_CHUNK_ROWS": "8",
    }
    with database_for(kind) as db_url, running_server(data_dir, database_url=db_url, env=env) as url:
        yield url, data_dir, kind


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, tmp_path_factory):
    with _serve(request.param, tmp_path_factory) as running:
        yield running


@pytest.fixture(scope="module")
def sqlite_server(tmp_path_factory):
    """For the image path, which does not depend on the database: one backend saves CPU."""
    with _serve("sqlite", tmp_path_factory) as running:
        yield running


def test_hostile_uploads_get_4xx_and_write_nothing(server):
    url, data_dir, _ = server
    with httpx.Client(base_url=url, timeout=60) as c:
        dataset_id = c.post("/v1/datasets", json={"name": "hostile", "encoder": "efficientnet-lite0"}).json()["id"]
        for kind, payload in HOSTILE.items():
            response = c.post(f"/v1/datasets/{dataset_id}/items", files={"file": ("upload.bin", payload)})
            assert 400 <= response.status_code < 500, (kind, response.status_code, response.text)
            assert "detail" in response.json()
        too_big = c.post(f"/v1/datasets/{dataset_id}/items", files={"file": ("big.zip", bytes(3_500_000))})
        assert too_big.status_code == 413
        assert c.post(f"/v1/datasets/{dataset_id}/items", files={"wrong": ("a.zip", make_zip(GOOD))}).status_code == 422
        assert c.get(f"/v1/datasets/{dataset_id}").json()["num_items"] == 0
    assert not (Path(data_dir) / "datasets" / dataset_id / "uploads").exists() or not any(
        (Path(data_dir) / "datasets" / dataset_id / "uploads").iterdir()
    )
    assert not any((Path(data_dir) / "tmp").glob("upload-*"))  # spools removed
    assert not (Path(data_dir).parent / "evil.jpg").exists() and not Path("/abs/evil.jpg").exists()


@pytest.mark.slow
def test_archive_of_real_images_fits_with_efficientnet(sqlite_server):
    url, _, _ = sqlite_server
    members = image_members(4)
    members["red/corrupt.jpg"] = b"\xff\xd8\xff\xe0 not really a jpeg"
    with httpx.Client(base_url=url, timeout=120) as c:
        dataset_id = c.post("/v1/datasets", json={"name": "colours", "encoder": "efficientnet-lite0"}).json()["id"]
        first = c.post(f"/v1/datasets/{dataset_id}/items", files={"file": ("a.zip", make_zip(members))})
        assert first.status_code == 201, first.text
        assert first.json()["num_items"] == 13
        second = {f"{k.split('/')[0]}/extra-{k.split('/')[1]}": v for k, v in image_members(1).items()}
        assert c.post(f"/v1/datasets/{dataset_id}/items", files={"file": ("b.tar.gz", make_tar(second))}).status_code == 201
        # The same names again are duplicate sample IDs.
        assert c.post(f"/v1/datasets/{dataset_id}/items", files={"file": ("b.tar.gz", make_tar(second))}).status_code == 409
        embeddings = c.post(f"/v1/datasets/{dataset_id}/embeddings",
                            files={"embeddings": ("e.npy", b"x"), "labels": ("l", b"1")})
        assert embeddings.status_code in (409, 422)

        job = wait_for_job(c, c.post(f"/v1/datasets/{dataset_id}/fit", json={"shrinkage": 0.1}).json()["job_id"], timeout=300)
        assert job["state"] == "succeeded", job
        assert job["result"]["num_failed"] == 1 and job["result"]["num_scored"] == 15
        got = c.get(f"/v1/datasets/{dataset_id}").json()
        assert got["fit"]["encoder"] == "efficientnet-lite0" and len(got["fit"]["weights_sha256"]) == 64
        assert got["num_failed"] == 1 and got["num_embedded"] == 15
        failures = c.get(f"/v1/datasets/{dataset_id}/failures").json()
        assert [f["sample_id"] for f in failures["items"]] == ["red/corrupt.jpg"]
        table = pa.ipc.open_stream(c.get(f"/v1/datasets/{dataset_id}/scores", params={"format": "arrow"}).content).read_all()
        assert "red/000.jpeg" in table.column("sample_id").to_pylist()
        near = c.get(f"/v1/datasets/{dataset_id}/samples/red/000.jpeg/neighbors", params={"k": 3}).json()
        assert near["label"] == "red" and len(near["neighbors"]) == 3
        scored = c.post(f"/v1/datasets/{dataset_id}/score", files={"file": ("n.zip", make_zip(image_members(1)))})
        assert scored.status_code == 202, scored.text  # an archive is scored by a job
        job = wait_for_job(c, scored.json()["job_id"], timeout=300)
        assert job["state"] == "succeeded" and job["kind"] == "score", job
        result = c.get(f"/v1/jobs/{job['id']}/result").json()
        assert {i["label"] for i in result["items"]} == set(COLOURS)


def test_image_fit_without_weights_fails_with_a_clear_message(server):
    url, _, _ = server
    with httpx.Client(base_url=url, timeout=120) as c:
        dataset_id = c.post("/v1/datasets", json={"name": "clip"}).json()["id"]  # default: CLIP ViT-B-16
        assert c.post(f"/v1/datasets/{dataset_id}/items", files={"file": ("a.zip", make_zip(image_members(1)))}).status_code == 201
        job = wait_for_job(c, c.post(f"/v1/datasets/{dataset_id}/fit").json()["job_id"], timeout=300)
        assert job["state"] == "failed"
        assert "checkpoint" in job["error"] or "weights" in job["error"], job["error"]
