"""`difficulty score --embeddings`: the main job on precomputed features, as a user runs it."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.ipc  # noqa: F401 (pa.ipc)
import pyarrow.parquet as pq
import pytest

from service.cli import main


def features(tmp_path, n=600, d=8, k=3, seed=0):
    rng = np.random.default_rng(seed)
    means = rng.normal(scale=3, size=(k, d))
    y = rng.integers(0, k, size=n)
    x = (means[y] + rng.normal(size=(n, d))).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    (tmp_path / "y.txt").write_text("".join(f"class-{v}\n" for v in y))
    (tmp_path / "ids.txt").write_text("".join(f"img/{i:04d}.jpg\n" for i in range(n)))
    return x, y


def test_console_script_writes_parquet_and_summary(tmp_path):
    features(tmp_path)
    out = tmp_path / "scores.parquet"
    proc = subprocess.run(
        [sys.executable, "-m", "service.cli", "score", "--embeddings", str(tmp_path / "x.npy"),
         "--labels", str(tmp_path / "y.txt"), "--ids", str(tmp_path / "ids.txt"), "-o", str(out)],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "hardest" in proc.stdout and "suspected mislabels" in proc.stdout
    table = pq.read_table(out)
    assert table.num_rows == 600
    assert table.column("sample_id")[0].as_py() == "img/0000.jpg"
    assert set(table.column("label").to_pylist()) == {"class-0", "class-1", "class-2"}


@pytest.mark.parametrize("suffix", [".csv", ".arrow"])
def test_other_formats_and_npy_labels(tmp_path, suffix):
    features(tmp_path)
    out = tmp_path / f"scores{suffix}"
    code = main(["score", "--embeddings", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"),
                 "--shrinkage", "0.05", "-o", str(out)])
    assert code == 0
    reference = tmp_path / "reference.parquet"
    assert main(["score", "--embeddings", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"),
                 "--shrinkage", "0.05", "-o", str(reference)]) == 0
    if suffix == ".csv":
        table = pacsv.read_csv(out, convert_options=pacsv.ConvertOptions(
            column_types={"sample_id": pa.string(), "label": pa.string(), "predicted_label": pa.string()}))
    else:
        table = pa.ipc.open_file(out).read_all()
    expected = pq.read_table(reference)
    assert table.num_rows == 600 and table.column_names == expected.column_names
    assert table.column("sample_id").to_pylist() == [str(i) for i in range(600)]
    assert set(table.column("label").to_pylist()) == {"0", "1", "2"}  # .npy integer labels
    assert table.column("label").to_pylist() == expected.column("label").to_pylist()
    np.testing.assert_allclose(table.column("rmd").to_numpy(), expected.column("rmd").to_numpy(), rtol=1e-12)


def test_mislabelled_samples_rank_high(tmp_path):
    x, y = features(tmp_path, n=1500, k=4, seed=3)
    rng = np.random.default_rng(0)
    flipped = rng.choice(len(y), size=75, replace=False)
    y = y.copy()
    y[flipped] = (y[flipped] + 1) % 4
    np.save(tmp_path / "y.npy", y)
    out = tmp_path / "s.parquet"
    assert main(["score", "--embeddings", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"), "-o", str(out)]) == 0
    rmd = pq.read_table(out).column("rmd").to_numpy()
    top = set(np.argsort(-rmd)[:75].tolist())
    assert len(top & set(flipped.tolist())) >= 65


def bad_cases(tmp_path):
    features(tmp_path)
    (tmp_path / "short.txt").write_text("a\nb\n")
    np.save(tmp_path / "nan.npy", np.array([[np.nan, 1.0], [1.0, 2.0]]))
    np.save(tmp_path / "one_d.npy", np.arange(5.0))
    (tmp_path / "notnpy.npy").write_bytes(b"hello")
    np.savez(tmp_path / "archive.npz", x=np.ones((3, 2)))
    (tmp_path / "dup.txt").write_text("a\n" * 600)
    (tmp_path / "two.txt").write_text("a\nb\n")
    e, lab = str(tmp_path / "x.npy"), str(tmp_path / "y.txt")
    return {
        "count mismatch": (["--embeddings", e, "--labels", str(tmp_path / "short.txt")], "counts must match"),
        "nan": (["--embeddings", str(tmp_path / "nan.npy"), "--labels", str(tmp_path / "two.txt")], "NaN"),
        "1-d": (["--embeddings", str(tmp_path / "one_d.npy"), "--labels", lab], "2-d"),
        "not npy": (["--embeddings", str(tmp_path / "notnpy.npy"), "--labels", lab], ".npy"),
        "npz": (["--embeddings", str(tmp_path / "archive.npz"), "--labels", lab], ".npy"),
        "duplicate ids": (["--embeddings", e, "--labels", lab, "--ids", str(tmp_path / "dup.txt")], "duplicates"),
        "bad shrinkage": (["--embeddings", e, "--labels", lab, "--shrinkage", "2"], "shrinkage"),
        "bad output": (["--embeddings", e, "--labels", lab, "-o", str(tmp_path / "x.xlsx")], "output"),
        "no labels": (["--embeddings", e], "--labels"),
        "missing file": (["--embeddings", str(tmp_path / "nope.npy"), "--labels", lab], "No such file"),
    }


@pytest.mark.parametrize("case", ["count mismatch", "nan", "1-d", "not npy", "npz", "duplicate ids",
                                  "bad shrinkage", "bad output", "no labels", "missing file"])
def test_bad_input_is_a_clear_cli_error(tmp_path, capsys, case):
    argv, message = bad_cases(tmp_path)[case]
    if "-o" not in argv:
        argv = [*argv, "-o", str(tmp_path / "out.parquet")]
    assert main(["score", *argv]) == 2
    err = capsys.readouterr().err
    assert "error" in err and message in err
    assert not (tmp_path / "out.parquet").exists()


def test_offline_table_equals_the_service_table(tmp_path, api_client):
    """`difficulty score` and a fit job leave the same score table, neighbor column included."""
    import io

    from conftest import wait_for_job

    x, y = features(tmp_path, n=500, k=3, seed=7)
    out = tmp_path / "offline.arrow"
    assert main(["score", "--embeddings", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.txt"),
                 "--ids", str(tmp_path / "ids.txt"), "--shrinkage", "auto-shared", "-o", str(out)]) == 0
    offline = pa.ipc.open_file(out).read_all()

    dataset_id = api_client.post("/v1/datasets", json={"name": "same", "encoder": "feats"}).json()["id"]
    files = {name: (name, (tmp_path / name).read_bytes()) for name in ("x.npy", "y.txt", "ids.txt")}
    uploaded = api_client.post(f"/v1/datasets/{dataset_id}/embeddings",
                               files={"embeddings": files["x.npy"], "labels": files["y.txt"], "ids": files["ids.txt"]})
    assert uploaded.status_code == 201, uploaded.text
    job = api_client.post(f"/v1/datasets/{dataset_id}/fit", json={"shrinkage": "auto-shared"}).json()
    assert wait_for_job(api_client, job["job_id"])["state"] == "succeeded"
    served = pa.ipc.open_stream(io.BytesIO(api_client.get(f"/v1/datasets/{dataset_id}/scores?format=arrow").content)).read_all()

    assert "knn_agreement" in offline.column_names
    assert served.column_names == offline.column_names
    served = served.sort_by("sample_id")
    offline = offline.sort_by("sample_id")
    for column in offline.column_names:
        if pa.types.is_floating(offline.schema.field(column).type):
            np.testing.assert_array_equal(served.column(column).to_numpy(), offline.column(column).to_numpy(), err_msg=column)
        else:
            assert served.column(column).to_pylist() == offline.column(column).to_pylist(), column
    assert np.isfinite(offline.column("knn_agreement").to_numpy()).all()
