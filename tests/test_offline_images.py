"""``difficulty score <folder|archive|manifest> --encoder ...``: offline, resumable, summarised."""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path

import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from imagedata import TINY_CLIP, save_tiny_clip_checkpoint, write_image_folder

from service.cli import main


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = save_tiny_clip_checkpoint(tmp_path_factory.mktemp("tiny"))
    return f"open_clip:{TINY_CLIP}:{path}"


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    write_image_folder(root, per_class=6)
    (root / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    return root


def test_score_folder_writes_table_and_summary(tiny_encoder: str, folder: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "scores.parquet"
    work = tmp_path / "work"
    rc = main(["score", str(folder), "--encoder", tiny_encoder, "-o", str(out), "--work-dir", str(work), "--top", "3"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    table = pq.read_table(out)
    assert table.num_rows == 18
    assert set(table.column_names) >= {"sample_id", "label", "rmd", "rmd_min", "predicted_label"}
    assert "hardest 3" in captured.out and "suspected mislabels" in captured.out
    assert "1 skipped as unusable" in captured.err and "red/broken.jpg" in captured.err
    # Same command again: everything comes from the work dir (resume), same scores.
    rc = main(["score", str(folder), "--encoder", tiny_encoder, "-o", str(out), "--work-dir", str(work)])
    captured = capsys.readouterr()
    assert rc == 0 and "embedded 0 new samples" in captured.err and "19 already processed" in captured.err
    assert pq.read_table(out).column("rmd").to_pylist() == table.column("rmd").to_pylist()


def test_score_zip_and_manifest(tiny_encoder: str, folder: Path, tmp_path: Path, capsys) -> None:
    archive = tmp_path / "ds.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(folder.rglob("*.jpg")):
            zf.write(path, path.relative_to(folder).as_posix())
    assert main(["score", str(archive), "--encoder", tiny_encoder, "-o", str(tmp_path / "a.csv")]) == 0
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label"])
        for path in sorted(folder.rglob("*.jpg")):
            writer.writerow([path, path.parent.name])
    assert main(["score", str(manifest), "--encoder", tiny_encoder, "-o", str(tmp_path / "m.parquet")]) == 0
    from_manifest = pq.read_table(tmp_path / "m.parquet")
    assert from_manifest.num_rows == 18
    # Same images, same labels: the zip and the manifest give the same scores per image.
    from_zip = pacsv.read_csv(tmp_path / "a.csv")
    zip_rmd = dict(zip(from_zip.column("sample_id").to_pylist(), from_zip.column("rmd").to_pylist(), strict=True))
    manifest_rmd = {
        Path(i).relative_to(folder).as_posix(): v
        for i, v in zip(from_manifest.column("sample_id").to_pylist(), from_manifest.column("rmd").to_pylist(), strict=True)
    }
    assert zip_rmd.keys() == manifest_rmd.keys() and len(zip_rmd) == 18
    for sample_id, value in zip_rmd.items():
        assert value == pytest.approx(manifest_rmd[sample_id], rel=1e-6, abs=1e-6)
    capsys.readouterr()


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--encoder", "no-such-encoder"], "unknown encoder"),
        (["--encoder", "open_clip:ViT-B-16:/missing/ckpt.bin"], "checkpoint file not found"),
    ],
)
def test_clear_cli_errors(folder: Path, tmp_path: Path, capsys, args: list[str], fragment: str) -> None:
    rc = main(["score", str(folder), *args, "-o", str(tmp_path / "s.parquet")])
    assert rc == 2 and fragment in capsys.readouterr().err


def test_missing_source_is_a_clear_error(tmp_path: Path, capsys) -> None:
    rc = main(["score", str(tmp_path / "nothing"), "--encoder", "efficientnet-lite0", "-o", str(tmp_path / "s.parquet")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
