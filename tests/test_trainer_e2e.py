"""End to end: the real service on loopback, a dataset uploaded and fitted, the trainer pulls
the scores over HTTP and trains one short epoch with the difficulty-aware loss on real
Fashion-MNIST images (an ImageFolder whose relative paths are the service's sample IDs)."""

from __future__ import annotations

import io
import json
import math

import httpx
import numpy as np
import pytest
from apiserver import running_server, wait_for_job
from ci import skip_unless_ci
from fmnist_images import CLASSES, write_png_folder

from trainer.cli import main as train_main
from trainer.client import (
    AuthenticationError,
    DatasetNotFittedError,
    DatasetNotFoundError,
    DifficultyClient,
)
from trainer.fmnist import load_fashion_mnist

KEY = "e2e-key-0123456789"
METRICS = (
    "accuracy", "nll", "brier", "ece", "adaptive_ece", "aurc", "eaurc",
    "misclassification_auroc", "ood_auroc", "fpr_at_95_tpr",
)  # fmt: skip

def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def test_pull_scores_and_train_one_epoch(tmp_path):
    try:
        images, labels = load_fashion_mnist("test")
    except FileNotFoundError as exc:
        skip_unless_ci(str(exc))
    rng = np.random.default_rng(0)
    pick = rng.permutation(len(labels))[:200]
    train_ids = write_png_folder(tmp_path / "train", images, labels, pick[:150])
    write_png_folder(tmp_path / "test", images, labels, pick[150:])
    train_labels = [CLASSES[y] for y in labels[pick[:150]]]
    # Class-structured features stand in for encoder features (the e2e path under test is
    # upload -> fit -> scores -> trainer; real encoders are tested on the service side).
    centers = rng.normal(size=(10, 16)) * 3
    features = (centers[labels[pick[:150]]] + rng.normal(size=(150, 16))).astype(np.float32)

    with (
        running_server(tmp_path / "data", api_keys={"team": KEY}) as base_url,
        httpx.Client(
            base_url=base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
        ) as http,
    ):
        created = http.post("/v1/datasets", json={"name": "fmnist-e2e"})
        assert created.status_code == 201, created.text
        dataset_id = created.json()["id"]
        unfitted_id = http.post("/v1/datasets", json={"name": "never-fitted"}).json()["id"]
        upload = http.post(
            f"/v1/datasets/{dataset_id}/embeddings",
            files={
                "embeddings": ("f.npy", npy_bytes(features), "application/octet-stream"),
                "labels": ("labels.txt", "\n".join(train_labels).encode(), "text/plain"),
                "ids": ("ids.txt", "\n".join(train_ids).encode(), "text/plain"),
            },
        )
        assert upload.status_code == 201, upload.text
        fit = http.post(f"/v1/datasets/{dataset_id}/fit", json={"shrinkage": 0.1})
        assert fit.status_code == 202, fit.text
        job = wait_for_job(http, fit.json()["job_id"], timeout=120)
        assert job["state"] == "succeeded", job

        cache = tmp_path / "cache"
        with DifficultyClient(
            base_url, KEY, cache_dir=cache, retries=1, sleep=lambda s: None
        ) as client:
            table = client.scores(dataset_id)
            assert sorted(table.column("sample_id").to_pylist()) == sorted(train_ids)
            with pytest.raises(DatasetNotFoundError):
                client.scores("no-such-dataset")
            with pytest.raises(DatasetNotFittedError):
                client.scores(unfitted_id)
        with (
            DifficultyClient(base_url, "wrong-key", cache_dir=cache, retries=0) as bad,
            pytest.raises(AuthenticationError),
        ):
            bad.scores(dataset_id)

        out = tmp_path / "run"
        code = train_main([
            "--data", str(tmp_path / "train"), "--test-data", str(tmp_path / "test"),
            "--grayscale", "--image-size", "28", "--model", "small-cnn", "--epochs", "1",
            "--batch-size", "32", "--loss", "difficulty", "--alpha", "0.5", "--temperature", "auto",
            "--service-url", base_url, "--dataset-id", dataset_id, "--api-key", KEY,
            "--cache-dir", str(cache), "--threads", "1", "--no-progress", "-o", str(out),
        ])  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    for name in METRICS:
        assert isinstance(report["metrics"][name], float) and math.isfinite(
            report["metrics"][name]
        ), name
    assert report["scores"]["source"] == "service"
    assert report["scores"]["dataset_id"] == dataset_id and report["scores"]["fit_id"]
    assert report["scores"]["trained_on"] == 150 and report["scores"]["missing"] == 0
    assert (
        report["train"]["test_samples"] == 50
        and report["ood"]["positive_class"] == "in-distribution"
    )
    assert "api_key" not in report["config"]  # secrets stay out of reports
    assert (out / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
