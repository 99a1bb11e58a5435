"""The over-confident-regimes benchmark (benchmarks/trainer_regimes.py) in its seconds-sized form:
both stages on real Fashion-MNIST pixels with the service's own statistics, and the pieces the
protocol rests on (noise draws, batched models = the trainer's MLP, selection on validation only).
About 10-20 s in all, most of it the smoke run."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ci import skip_unless_ci

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import trainer_regimes as R  # noqa: E402

from trainer.fmnist import load_fashion_mnist  # noqa: E402
from trainer.models import MLP  # noqa: E402


def test_batched_mlp_is_the_trainers_mlp_and_groups_are_independent():
    torch.manual_seed(0)
    batched = R.BatchedMLP(3)
    x = torch.randn(5, 784)
    single = MLP(784)
    linears = [m for m in single.net if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for lin, w, b in zip(linears, batched.weights, batched.biases, strict=True):
            lin.weight.copy_(w[1].T)
            lin.bias.copy_(b[1, 0])
    out = batched(x)
    assert out.shape == (3, 5, 10)
    assert torch.allclose(out[1], single(x), atol=1e-5)
    assert torch.allclose(out[0], out[2])  # one initialisation for every configuration
    out[0].sum().backward()  # a loss on model 0 moves model 0 only
    assert all(w.grad[1:].abs().max() == 0 for w in batched.weights)


def test_noise_draws():
    labels = np.repeat(np.arange(10), 100)
    noisy, flipped = R.corrupt(labels, R.Regime("symmetric", 0.2, 1000, 1), seed=0)
    assert flipped.sum() == 200 and (noisy[flipped] != labels[flipped]).all()
    assert (noisy[~flipped] == labels[~flipped]).all()
    noisy, flipped = R.corrupt(labels, R.Regime("pairs", 0.4, 1000, 1), seed=0)
    partner = {0: 6, 6: 0, 2: 4, 4: 2, 7: 9, 9: 7}
    assert flipped.sum() == 6 * 40  # 40% of each of the six paired classes, none of the rest
    assert all(noisy[i] == partner[labels[i]] for i in np.flatnonzero(flipped))
    again, _ = R.corrupt(labels, R.Regime("pairs", 0.4, 1000, 1), seed=0)
    other, _ = R.corrupt(labels, R.Regime("pairs", 0.4, 1000, 1), seed=1)
    assert (again == noisy).all() and (other != noisy).any()  # seeded, and the draw differs


def test_selection_uses_validation_only():
    def run(regime, method, params, val_nll):
        return {"regime": regime, "method": method, "params": params, "seed": 0, "weights": {},
                "val_noisy": {"nll": val_nll}, "val_clean": {"nll": -val_nll},
                "test": {"nll": -100.0 * val_nll}}  # fmt: skip

    runs = [
        run("a", "er", {"beta": 0.1}, 1.0), run("a", "er", {"beta": 0.4}, 0.9),
        run("a", "difficulty", {"mapping": "rank", "temperature": 0.3, "alpha": 1.0}, 0.8),
        run("a", "difficulty", {"mapping": "rank", "temperature": 1.0, "alpha": 1.0}, 0.85),
        run("b", "er", {"beta": 0.1}, 1.0),
        run("b", "difficulty", {"mapping": "rank", "temperature": 0.3, "alpha": 1.0}, 0.95),
        run("b", "difficulty", {"mapping": "rank", "temperature": 1.0, "alpha": 1.0}, 0.9),
    ]  # fmt: skip
    sel = R.select(runs)
    assert sel["per_regime"]["a"]["er"]["val_noisy"]["params"] == {"beta": 0.4}
    # The clean-validation choice is the opposite here (its NLL has the other sign).
    assert sel["per_regime"]["a"]["er"]["val_clean"]["params"] == {"beta": 0.1}
    # Mean regret over regimes: T=0.3 -> (0 + 0.05) / 2, T=1 -> (0.05 + 0) / 2: a tie broken by
    # order; make T=0.3 clearly better in regime b and it must win.
    runs[5]["val_noisy"]["nll"] = 0.89
    assert R.select(runs)["default"] == {"mapping": "rank", "temperature": 0.3, "alpha": 1.0}


def test_a_fixed_default_stays_when_a_regime_is_added():
    def run(regime, mapping, t, alpha, val_nll):
        return {"regime": regime, "method": "difficulty", "seed": 0, "weights": {},
                "params": {"mapping": mapping, "temperature": t, "alpha": alpha},
                "val_noisy": {"nll": val_nll}, "val_clean": {"nll": val_nll}}  # fmt: skip

    runs = [run("a", "quantile", None, 1.0, 0.8), run("a", "rank", 0.3, 1.0, 0.9)]
    fixed = R.select(runs)
    assert fixed["default"] == {"mapping": "quantile", "temperature": None, "alpha": 1.0}
    # A new regime where rank wins by far: alone, the runs would now pick rank ...
    runs += [run("b", "quantile", None, 1.0, 2.0), run("b", "rank", 0.3, 1.0, 0.5)]
    assert R.select(runs)["default"]["mapping"] == "rank"
    # ... but the committed default stays, with what the runs alone would pick beside it.
    kept = R.select(runs, fixed=fixed)
    assert kept["default"] == fixed["default"] and kept["default_regimes"] == ["a"]
    assert kept["mapping_regret"] == fixed["mapping_regret"]
    assert kept["default_recomputed"]["mapping"] == "rank" and kept["regimes"] == ["a", "b"]
    assert set(kept["per_regime"]) == {"a", "b"}
    assert R.select(runs, fixed=kept)["default"] == fixed["default"]  # and again


def test_smoke_run_both_stages(tmp_path):
    try:
        _, labels = load_fashion_mnist("train")
    except FileNotFoundError as exc:
        skip_unless_ci(str(exc))
    # Stand-in features (64-d, class-structured) for the 400 rows: the protocol, not the encoder,
    # is under test here; the full benchmark reads the service's EfficientNet-Lite0 features.
    rows = np.sort(np.random.default_rng(0).choice(len(labels), 400, replace=False))
    rng = np.random.default_rng(1)
    centres = rng.normal(0, 1, (10, 64))
    feats = (centres[labels[rows]] + rng.normal(0, 1.5, (400, 64))).astype(np.float32)
    np.savez(tmp_path / "f.npz", features=feats, labels=labels[rows], indices=rows)
    out = tmp_path / "out" / "regimes"
    code = R.main(["all", "--smoke", "--features", str(tmp_path / "f.npz"), "--ood", "none",
                   "--work-dir", str(tmp_path / "work"), "--out", str(out), "--test-subset", "300"])  # fmt: skip
    assert code == 0
    result = json.loads(out.with_suffix(".json").read_text())
    assert result["selection"]["default"]["mapping"] in ("rank", "exp-max")
    assert all("test" not in r for r in result["select_runs"])  # select never saw the test set
    assert {r["stage"] for r in result["final_runs"]} == {"final"}
    for regime in R.SMOKE_REGIMES:
        final = [r for r in result["final_runs"] if r["regime"] == regime]
        assert {r["seed"] for r in final} == set(R.FINAL_SEEDS)
        for seed in R.FINAL_SEEDS:
            by_role = {r["role"]: r for r in final if r["seed"] == seed}
            da, er = by_role["difficulty-default"], by_role["er-matched"]
            # Matched constant ER: beta = alpha * mean(w) of that seed's difficulty-aware run.
            assert er["params"]["beta"] == pytest.approx(
                da["params"]["alpha"] * da["weights"]["mean_weight"]
            )
            assert 0 <= da["test"]["ece"] <= 1 and da["test"]["accuracy"] > 0
    text = out.with_suffix(".md").read_text()
    assert "Every configuration tried" in text and "## sym20 (final, test set)" in text

    # Restored into an empty work dir, the output's runs are reused as they are: a final run
    # over one regime plus the restored ones gives back the same results, nothing retrained.
    again = tmp_path / "out" / "again"
    code = R.main(["final", "--smoke", "--features", str(tmp_path / "f.npz"), "--ood", "none",
                   "--work-dir", str(tmp_path / "work2"), "--out", str(again), "--test-subset", "300",
                   "--restore-from", str(out.with_suffix(".json"))])  # fmt: skip
    assert code == 0
    restored = json.loads(again.with_suffix(".json").read_text())
    assert restored["final_runs"] == result["final_runs"]
    assert restored["select_runs"] == result["select_runs"]
    assert restored["selection"] == result["selection"]
