"""difficulty-train without a server: offline score files, missing-score policy, error exits."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from trainer.cli import main
from trainer.train import augment_batch


@pytest.fixture()
def folders(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("test", 4)):
        for cls, level in (("dark", 40), ("light", 200)):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(level, 20, (12, 12)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    return tmp_path


def run(folders, *extra):
    base = ["--data", str(folders / "train"), "--test-data", str(folders / "test"), "--grayscale",
            "--image-size", "12", "--epochs", "1", "--batch-size", "8", "--threads", "1",
            "--no-progress", "-o", str(folders / "out")]  # fmt: skip
    return main(base + list(extra))


def write_scores(path, ids, labels):
    pq.write_table(
        pa.table({"sample_id": ids, "label": labels, "rmd": np.arange(len(ids), dtype=float)}), path
    )


def test_offline_scores_and_missing_policy(folders, capsys):
    ids = [f"{c}/{i}.png" for c in ("dark", "light") for i in range(8)]
    labels = [i.split("/")[0] for i in ids]
    write_scores(folders / "partial.parquet", ids[:-2], labels[:-2])
    assert (
        run(folders, "--loss", "difficulty", "--scores-file", str(folders / "partial.parquet")) == 2
    )
    assert "2 of 16 samples have no difficulty score" in capsys.readouterr().err
    code = run(folders, "--loss", "difficulty", "--scores-file", str(folders / "partial.parquet"),
               "--missing-scores", "zero-weight", "--alpha", "0.3", "--mapping", "rank", "-T", "2")  # fmt: skip
    assert code == 0
    report = json.loads((folders / "out" / "report.json").read_text())
    assert report["scores"]["missing"] == 2 and report["scores"]["temperature"] == 2.0
    assert report["metrics"]["ood_auroc"] is not None
    # The mapping, its resolved parameters, and the mean weight over the 16 samples trained on
    # (14 rank weights, 2 zero-weight ones), with the matching constant-ER beta.
    s = report["scores"]
    assert s["mapping"] == "rank" and s["mapping_params"] == {"temperature": 2.0}
    ranks = np.arange(1, 15) / 14  # the 14 scores 0..13 are distinct
    assert s["mean_weight"] == pytest.approx(np.exp((ranks - 1) / 2.0).sum() / 16, rel=1e-6)
    assert s["matched_er_beta"] == pytest.approx(0.3 * s["mean_weight"])


def png_width(path) -> int:
    return int.from_bytes(path.read_bytes()[16:20], "big")  # the IHDR chunk's width field


def test_compare_ce_side_by_side(folders, capsys):
    ids = [f"{c}/{i}.png" for c in ("dark", "light") for i in range(8)]
    write_scores(folders / "s.parquet", ids, [i.split("/")[0] for i in ids])
    assert run(folders, "--loss", "difficulty", "--scores-file", str(folders / "s.parquet"),
               "--mapping", "quantile", "--quantile-low", "0.1", "--quantile-high", "0.9",
               "--ood", "none") == 0  # fmt: skip
    single = png_width(folders / "out" / "reliability.png")
    assert run(folders, "--loss", "difficulty", "--scores-file", str(folders / "s.parquet"),
               "--mapping", "quantile", "--quantile-low", "0.1", "--quantile-high", "0.9",
               "--ood", "none", "--compare", "ce") == 0  # fmt: skip
    report = json.loads((folders / "out" / "report.json").read_text())
    assert report["scores"]["mapping"] == "quantile"
    assert report["scores"]["mapping_params"]["low"] == 0.1
    assert report["compare"]["ce"]["config"]["loss"] == "ce"
    assert set(report["compare"]["ce"]["metrics"]) == set(report["metrics"])
    assert png_width(folders / "out" / "reliability.png") > 1.8 * single  # two panels
    assert '"compare": "ce"' in capsys.readouterr().out
    # A parameter the mapping does not take is an error, not silently ignored.
    assert run(folders, "--loss", "difficulty", "--scores-file", str(folders / "s.parquet"),
               "--mapping", "rank", "--quantile-low", "0.1") == 2  # fmt: skip
    assert "takes temperature" in capsys.readouterr().err
    assert run(folders, "--loss", "difficulty", "--scores-file", str(folders / "s.parquet"),
               "-T", "2") == 2  # the default (quantile) has no temperature  # fmt: skip
    assert "takes low, high" in capsys.readouterr().err


def test_errors_exit_2(folders, capsys):
    assert run(folders, "--loss", "difficulty") == 2
    assert "needs scores" in capsys.readouterr().err
    assert run(folders, "--loss", "difficulty", "--scores-file", str(folders / "nope.parquet")) == 2
    assert "not found" in capsys.readouterr().err
    ids = [f"{c}/{i}.png" for c in ("dark", "light") for i in range(8)]
    write_scores(folders / "swapped.parquet", ids, ["light"] * 8 + ["dark"] * 8)
    assert (
        run(folders, "--loss", "difficulty", "--scores-file", str(folders / "swapped.parquet")) == 2
    )
    assert "different label" in capsys.readouterr().err


def test_plain_loss_without_ood(folders):
    assert (
        run(
            folders, "--loss", "focal", "--ood", "none", "--optimizer", "adam", "--schedule", "step"
        )
        == 0
    )
    report = json.loads((folders / "out" / "report.json").read_text())
    assert report["metrics"]["ood_auroc"] is None and report["scores"] is None
    assert report["config"]["loss"] == "focal"


def test_augment_keeps_shape_and_content():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6)
    out = augment_batch(x, pad=1)
    assert out.shape == x.shape
    # Nearest-neighbour shifts/flips move pixels, never invent values.
    assert set(out.unique().tolist()) <= set(x.unique().tolist()) | {0.0}
    # Shifted-in edges take the fill (normalised black), not normalised 0 (a grey).
    torch.manual_seed(0)
    flat = torch.full((64, 1, 6, 6), 5.0)
    filled = augment_batch(flat, pad=1, fill=-0.81)
    values = sorted(filled.unique().tolist())
    assert len(values) == 2 and values[0] == pytest.approx(-0.81) and values[1] == 5.0


def test_report_is_strict_json_with_undefined_metrics(tmp_path):
    from trainer.train import write_outputs

    probs = np.eye(2)[[0, 1]]
    report = {
        "metrics": {"misclassification_auroc": float("nan"), "ece": 0.0},
        "config": {"loss": "ce"},
    }
    write_outputs(report, probs, np.array([0, 1]), tmp_path)
    text = (tmp_path / "report.json").read_text()
    assert json.loads(text)["metrics"]["misclassification_auroc"] is None and "NaN" not in text
