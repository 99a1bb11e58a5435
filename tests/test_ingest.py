"""Readers: ImageFolder, zip, tar(.gz) streamed, manifests, WebDataset shards; detection."""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from imagedata import jpeg_bytes, write_image_folder, zip_folder

from service.ingest import ReaderError, Sample, open_source
from service.ingest.archive import TarSource, ZipSource
from service.ingest.folder import FolderSource
from service.ingest.manifest import ManifestSource
from service.ingest.webdataset import WebDatasetSource, expand_shard_pattern, split_key


def _read(sample: Sample) -> bytes:
    if sample.data is not None:
        return sample.data
    assert sample.path is not None
    return Path(sample.path).read_bytes()


def _tar_add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def test_sample_contract() -> None:
    s = Sample("cat/001.jpg", "cat")
    assert (s.data, s.path) == (None, None)
    with pytest.raises(AttributeError):
        s.label = "dog"  # type: ignore[misc]


def test_folder_ids_labels_and_skips(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    ids = write_image_folder(root, per_class=2)
    (root / "red" / ".DS_Store").write_bytes(b"junk")
    (root / "__MACOSX").mkdir()
    (root / "__MACOSX" / "x.jpg").write_bytes(b"junk")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "y.jpg").write_bytes(b"junk")
    os.symlink("/etc/passwd", root / "red" / "link.jpg")
    os.symlink(root / "red", root / "linked-dir")
    (root / "loose.jpg").write_bytes(jpeg_bytes((1, 2, 3)))

    source = open_source(root)
    assert isinstance(source, FolderSource)
    samples = list(source)
    assert sorted(s.sample_id for s in samples) == sorted(ids + ["loose.jpg"])
    assert [s.sample_id for s in source] == [s.sample_id for s in samples]  # stable order
    by_id = {s.sample_id: s for s in samples}
    assert by_id["red/000.jpg"].label == "red"
    assert by_id["loose.jpg"].label is None  # top-level files are unlabelled
    assert by_id["blue/001.jpg"].path == str(root / "blue" / "001.jpg")
    assert source.count() == len(samples)


def test_zip_reads_members_and_refuses_unsafe(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    ids = write_image_folder(root, per_class=2)
    target = tmp_path / "ds.zip"
    target.write_bytes(zip_folder(root, {"__MACOSX/red/._000.jpg": b"x", "red/.DS_Store": b"x", "../evil.jpg": b"x"}))
    with zipfile.ZipFile(target, "a") as zf:  # a symlink member (unix mode bits)
        info = zipfile.ZipInfo("red/link.jpg")
        info.external_attr = (0o120777 << 16)
        zf.writestr(info, "/etc/passwd")
    source = open_source(target)
    assert isinstance(source, ZipSource)
    samples = list(source)
    good = [s for s in samples if s.error is None]
    assert [s.sample_id for s in good] == ids
    assert all(_read(s) == (root / s.sample_id).read_bytes() for s in good)
    assert [s.label for s in good][:2] == ["blue", "blue"]
    unsafe = [s for s in samples if s.error]
    assert len(unsafe) == 1 and "unsafe" in (unsafe[0].error or "")
    assert source.count() == len(samples)


@pytest.mark.parametrize("suffix,mode", [(".tar", "w"), (".tar.gz", "w:gz"), (".tgz", "w:gz")])
def test_tar_streams_members(tmp_path: Path, suffix: str, mode: str) -> None:
    root = tmp_path / "ds"
    ids = write_image_folder(root, per_class=2)
    target = tmp_path / f"ds{suffix}"
    with tarfile.open(target, mode) as archive:
        archive.add(root, arcname=".", recursive=True)  # members named ./blue/000.jpg
        link = tarfile.TarInfo("red/link.jpg")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        archive.addfile(link)
        _tar_add(archive, "red/._000.jpg", b"appledouble")
    source = open_source(target)
    assert isinstance(source, TarSource)
    samples = list(source)
    assert sorted(s.sample_id for s in samples) == ids  # './' stripped, link + hidden skipped
    assert all(s.error is None and _read(s) == (root / s.sample_id).read_bytes() for s in samples)
    assert {s.label for s in samples} == {"red", "green", "blue"}
    assert source.count() == len(ids)


def test_truncated_tar_gz_ends_with_a_listed_error(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    write_image_folder(root, per_class=3, size=64)
    target = tmp_path / "ds.tar.gz"
    with tarfile.open(target, "w:gz") as archive:
        archive.add(root, arcname="")
    data = target.read_bytes()
    target.write_bytes(data[: len(data) * 2 // 3])
    samples = list(open_source(target))
    assert samples and samples[-1].error is not None
    assert "unreadable" in samples[-1].error or "truncated" in samples[-1].error


def test_manifests_csv_jsonl_parquet(tmp_path: Path) -> None:
    root = tmp_path / "images"
    ids = write_image_folder(root, per_class=1)
    rows = [{"path": f"images/{i}", "label": i.split("/")[0], "id": f"s{n}"} for n, i in enumerate(ids)]
    rows.append({"path": str(root / ids[0]), "label": "", "id": "absolute"})
    with open(tmp_path / "m.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["path", "label", "id"])
        writer.writeheader()
        writer.writerows(rows)
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    for name in ("m.csv", "m.jsonl", "m.parquet"):
        source = open_source(tmp_path / name)
        assert isinstance(source, ManifestSource)
        samples = list(source)
        assert [s.sample_id for s in samples] == [r["id"] for r in rows]
        assert samples[0].label == "blue" and samples[-1].label is None
        assert all(_read(s) for s in samples)
        assert source.count() == len(rows)


def test_manifest_without_id_uses_path_and_reports_bad_rows(tmp_path: Path) -> None:
    (tmp_path / "m.jsonl").write_text('{"path": "a.jpg", "label": "x"}\nnot json\n{"label": "y"}\n')
    samples = list(open_source(tmp_path / "m.jsonl"))
    assert samples[0].sample_id == "a.jpg" and samples[0].path == str(tmp_path / "a.jpg")
    assert "invalid JSON" in (samples[1].error or "")
    assert samples[2].error == "row has no path"
    (tmp_path / "bad.csv").write_text("file,label\na.jpg,x\n")
    with pytest.raises(ReaderError, match="'path' column"):
        list(open_source(tmp_path / "bad.csv"))


def _write_shard(path: Path, start: int, n: int, with_cls: bool = True) -> list[str]:
    keys = []
    with tarfile.open(path, "w") as archive:
        for i in range(start, start + n):
            key = f"{i:06d}"
            keys.append(key)
            _tar_add(archive, f"{key}.jpg", jpeg_bytes((10 * i % 255, 20, 30), 24, seed=i))
            if with_cls:
                _tar_add(archive, f"{key}.cls", f"{i % 3}\n".encode())
            _tar_add(archive, f"{key}.json", b"{}")
    return keys


def test_webdataset_shards_file_dir_and_pattern(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    keys = _write_shard(shards / "data-000.tar", 0, 4) + _write_shard(shards / "data-001.tar", 4, 3)
    one = open_source(shards / "data-000.tar")
    assert isinstance(one, WebDatasetSource)
    samples = list(one)
    assert [s.sample_id for s in samples] == keys[:4]
    assert [s.label for s in samples] == ["0", "1", "2", "0"]
    assert samples[1].data == jpeg_bytes((10, 20, 30), 24, seed=1)
    for location in (shards, str(shards / "data-*.tar"), str(shards / "data-{000..001}.tar")):
        source = open_source(location)
        assert isinstance(source, WebDatasetSource)
        assert [s.sample_id for s in source] == keys


def test_webdataset_sample_without_image_is_an_error(tmp_path: Path) -> None:
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as archive:
        _tar_add(archive, "a.cls", b"1")
        _tar_add(archive, "a.txt", b"caption")
        _tar_add(archive, "b.cls", b"2")
        _tar_add(archive, "b.png", b"\x89PNG...")
    samples = list(open_source(shard))
    assert samples[0].sample_id == "a" and "no image member" in (samples[0].error or "")
    assert samples[1].label == "2" and samples[1].data == b"\x89PNG..."


def test_imagefolder_tar_is_not_webdataset(tmp_path: Path) -> None:
    target = tmp_path / "x.tar"
    with tarfile.open(target, "w") as archive:
        _tar_add(archive, "cat/001.jpg", jpeg_bytes((1, 1, 1)))
    assert isinstance(open_source(target), TarSource)


def test_helpers_and_refusals(tmp_path: Path) -> None:
    assert split_key("dir/abc.seg.jpg") == ("dir/abc", "seg.jpg")
    assert expand_shard_pattern(str(tmp_path / "none-{0..2}.tar")) == []
    with pytest.raises(ReaderError, match="does not exist"):
        open_source(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ReaderError, match="cannot read"):
        open_source(tmp_path / "notes.txt")
    # An upload saved without an extension is sniffed (the service stores archives this way).
    raw = tmp_path / "archive"
    with zipfile.ZipFile(raw, "w") as zf:
        zf.writestr("cat/1.jpg", jpeg_bytes((5, 5, 5)))
    assert isinstance(open_source(raw), ZipSource)


def test_webdataset_bad_member_fails_its_key_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import service.ingest.archive as archive_module

    monkeypatch.setattr(archive_module, "MAX_ITEM_BYTES", 1000)
    shard = tmp_path / "s.tar"
    with tarfile.open(shard, "w") as archive:
        _tar_add(archive, "000.cls", b"3")
        _tar_add(archive, "000.jpg", b"x" * 5000)  # over the (lowered) member limit
        _tar_add(archive, "001.cls", b"4")
        _tar_add(archive, "001.jpg", jpeg_bytes((1, 2, 3), 24))
    samples = list(open_source(shard))
    assert [(s.sample_id, s.label) for s in samples] == [("000", "3"), ("001", "4")]
    assert samples[0].error == "000.jpg: member too large (5000 bytes)"
    assert samples[1].error is None and samples[1].data == jpeg_bytes((1, 2, 3), 24)


def test_a_real_path_with_pattern_characters_is_not_a_shard_pattern(tmp_path: Path) -> None:
    root = tmp_path / "imgs[v2]{a}"
    ids = write_image_folder(root, per_class=1)
    source = open_source(root)
    assert isinstance(source, FolderSource)
    assert sorted(s.sample_id for s in source) == ids


@pytest.mark.parametrize(
    "raw,expected",
    [("cat/001.jpg", "cat/001.jpg"), ("./cat//001.jpg", "cat/001.jpg"), ("cat\\001.jpg", None),
     ("../cat/001.jpg", None), ("/cat/001.jpg", None), ("C:cat/001.jpg", None)],
    ids=["plain", "dots-and-slashes", "backslash", "parent", "absolute", "drive"],
)
def test_one_member_name_rule_for_readers_and_uploads(tmp_path, raw, expected):
    """The CLI's readers and the upload check derive the same sample ID, or both refuse."""
    from service.ingest.archive import ZipSource
    from service.ingest.safety import ArchiveError, inspect_archive

    path = tmp_path / "one.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(raw, jpeg_bytes((200, 30, 30)))
    (sample,) = list(ZipSource(path))
    if expected is None:
        assert sample.error is not None and "unsafe member path" in sample.error
        with pytest.raises(ArchiveError, match="unsafe member path"):
            inspect_archive(path)
    else:
        assert sample.error is None and sample.sample_id == expected
        assert [m.name for m in inspect_archive(path)] == [expected]
