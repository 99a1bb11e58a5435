"""Hostile precomputed-feature uploads: over-long or non-UTF-8 labels and IDs, NUL, float64
values float32 cannot hold, huge label files. Each is refused at the door (422 naming the limit)
and the dataset stays usable. Before: a non-UTF-8 label made GET /v1/datasets answer 500 for
good; a 1e300 value became inf in the store and failed every later fit.

Cost: in-process app (~1 s) + one small fit (~2 s); the reader cases < 0.1 s.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from conftest import blobs, wait_for_job

from service.ingest.features import InputError, load_ids, load_labels
from service.ingest.sample import MAX_LABEL_LENGTH, MAX_SAMPLE_ID_LENGTH


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def upload(c, dataset_id: str, features: np.ndarray, labels: bytes, ids: bytes | None = None):  # type: ignore[no-untyped-def]
    files = {"embeddings": ("e.npy", npy(features)), "labels": ("l", labels)}
    if ids is not None:
        files["ids"] = ("i", ids)
    return c.post(f"/v1/datasets/{dataset_id}/embeddings", files=files)


def test_hostile_labels_ids_and_values_are_refused_and_the_dataset_survives(api_client):
    c = api_client
    dataset_id = c.post("/v1/datasets", json={"name": "target", "encoder": "feats"}).json()["id"]
    features, classes = blobs(60)
    text = "\n".join(str(v) for v in classes).encode()
    bad_utf8 = np.array([b"ok"] * 59 + [b"caf\xe9"], dtype="S8")
    surrogate = np.array(["ok"] * 59 + [b"caf\xe9".decode("utf-8", "surrogateescape")])
    huge = features.astype(np.float64)
    huge[7, 2] = 1e300
    cases = {
        "long label (text)": (features, b"\n".join([b"a" * (MAX_LABEL_LENGTH + 1)] * 60), None, "limit of"),
        "long label (.npy)": (features, npy(np.array(["a" * (MAX_LABEL_LENGTH + 1)] * 60)), None, "limit of"),
        "long id": (features, text, b"\n".join(b"%d" % i + b"x" * MAX_SAMPLE_ID_LENGTH for i in range(60)), "limit of"),
        "non-UTF-8 bytes label": (features, npy(bad_utf8), None, "UTF-8"),
        "lone surrogate label": (features, npy(surrogate), None, "UTF-8"),
        "non-UTF-8 id line": (features, text, b"\n".join([b"x%d" % i for i in range(59)] + [b"caf\xe9"]), "UTF-8"),
        "NUL in id": (features, text, b"\n".join([b"x%d" % i for i in range(59)] + [b"a\x00b"]), "NUL"),
        "NUL in label": (features, b"\n".join([b"a"] * 59 + [b"b\x00"]), None, "NUL"),
        "beyond float32": (huge, text, None, "float32"),
    }
    for what, (array, labels, ids, needle) in cases.items():
        response = upload(c, dataset_id, array, labels, ids)
        assert response.status_code == 422, (what, response.text)
        assert needle in response.json()["detail"], (what, response.json())
        assert c.get("/v1/datasets").status_code == 200, what
        assert c.get(f"/v1/datasets/{dataset_id}").status_code == 200, what
    # float64 inside float32's range is fine, and the dataset still fits.
    assert upload(c, dataset_id, features.astype(np.float64), text).status_code == 201
    job = wait_for_job(c, c.post(f"/v1/datasets/{dataset_id}/fit").json()["job_id"])
    assert job["state"] == "succeeded", job


def test_label_file_is_not_read_past_the_row_count(tmp_path):
    """A label file longer than the embeddings is refused one line past the count."""
    path = tmp_path / "labels.txt"
    with open(path, "wb") as fh:
        fh.write(b"a\n" * 1000)
        fh.write(b"b" * (8 << 20))  # an 8 MiB last line that is never reached
    with pytest.raises(InputError, match="10 embeddings but more labels"):
        load_labels(path, max_count=10)
    one_line = tmp_path / "one-line.txt"
    one_line.write_bytes(b"x" * (8 << 20))  # no newline at all: read up to the limit only
    with pytest.raises(InputError, match=f"limit of {MAX_SAMPLE_ID_LENGTH} characters"):
        load_ids(one_line, max_count=10)
    # Ordinary files: trailing blank lines allowed, CRLF handled, inner blank lines refused.
    ok = tmp_path / "ok.txt"
    ok.write_bytes(b"a\r\nb\r\n\r\n\n")
    assert load_labels(ok, max_count=2) == ["a", "b"]
    gap = tmp_path / "gap.txt"
    gap.write_bytes(b"a\n\nb\n")
    with pytest.raises(InputError, match="empty lines"):
        load_labels(gap)
