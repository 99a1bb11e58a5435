"""Weight mappings (trainer.weights) against hand-computed values, and the properties the method
asks of them: bounded in [0, 1], monotone, not governed by one outlier. All pure numpy; the
whole file runs in well under a second."""

from __future__ import annotations

import math

import numpy as np
import pytest

from trainer.losses import DifficultyAwareLoss
from trainer.weights import (
    DEFAULT_MAPPING,
    MAPPING_NAMES,
    MAPPING_PARAMS,
    RANK_T,
    difficulty_weights,
    map_scores,
)


def test_rank_hand_computed():
    # ranks (1 = easiest) 1, 3, 2, 4 of N = 4 -> u = r/N = .25, .75, .5, 1.
    w = difficulty_weights([10.0, 30.0, 20.0, 40.0], "rank", temperature=0.5)
    assert w == pytest.approx(np.exp(np.array([-0.75, -0.25, -0.5, 0.0]) / 0.5))
    # Ties share their average rank: (1.5, 1.5, 3) / 3.
    tied = difficulty_weights([1.0, 1.0, 2.0], "rank", temperature=1.0)
    assert tied == pytest.approx(np.exp([-0.5, -0.5, 0.0]))
    auto = map_scores([0.0, 1.0], "rank")
    assert auto.params == {"temperature": RANK_T}
    assert auto.weights == pytest.approx([math.exp(-0.5 / RANK_T), 1.0])


def test_quantile_hand_computed():
    s = np.arange(11.0)  # quantiles 0.1 and 0.9 of 0..10 are 1 and 9
    m = map_scores(s, "quantile", low=0.1, high=0.9)
    assert m.params["score_low"] == pytest.approx(1.0) and m.params["score_high"] == pytest.approx(9.0)
    assert m.weights == pytest.approx(np.clip((s - 1.0) / 8.0, 0.0, 1.0))
    assert m.weights[[0, 1, 5, 9, 10]].tolist() == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.0])
    # Coinciding quantiles (mostly tied scores): a step, the tied value at 0.5.
    step = difficulty_weights([0.0] * 9 + [5.0], "quantile", low=0.1, high=0.5)
    assert step.tolist() == [0.5] * 9 + [1.0]
    with pytest.raises(ValueError, match="low < high"):
        map_scores(s, "quantile", low=0.9, high=0.1)


def test_robust_sigmoid_hand_computed():
    s = np.array([0.0, 1.0, 2.0, 3.0, 100.0])  # median 2, |s - 2| = 2, 1, 0, 1, 98: MAD 1
    m = map_scores(s, "robust-sigmoid", temperature=2.0)
    scale = 1.4826
    assert m.params["median"] == 2.0 and m.params["scale"] == pytest.approx(scale)
    expected = 1.0 / (1.0 + np.exp(-(s - 2.0) / (2.0 * scale)))
    assert m.weights == pytest.approx(expected)
    assert m.weights[2] == pytest.approx(0.5)


def test_exp_max_is_the_original_formula():
    assert difficulty_weights([0.0, 1.0, 2.0], "exp-max", temperature=1.0) == pytest.approx(
        np.exp([-2.0, -1.0, 0.0])
    )
    t = math.sqrt(2.0 / 3.0)  # population std of (0, 1, 2)
    m = map_scores([0.0, 1.0, 2.0], "exp-max")
    assert m.params["temperature"] == pytest.approx(t)
    assert m.weights == pytest.approx(np.exp(np.array([-2.0, -1.0, 0.0]) / t))
    assert difficulty_weights([5.0, 5.0], "exp-max").tolist() == [1.0, 1.0]


def test_rank_is_invariant_to_monotone_transforms():
    rng = np.random.default_rng(0)
    s = np.round(rng.normal(0, 5, 500), 1)  # rounded: ties included
    base = difficulty_weights(s, "rank", temperature=0.3)
    for transformed in (3.0 * s + 7.0, np.exp(s / 3.0), s**3, np.arctan(s), np.minimum(s, 100.0)):
        assert difficulty_weights(transformed, "rank", temperature=0.3) == pytest.approx(base)
    # ... and so to the outlier: moving the hardest sample to 3,848 changes nothing.
    spiked = s.copy()
    spiked[np.argmax(s)] = 3848.0
    assert difficulty_weights(spiked, "rank") == pytest.approx(difficulty_weights(s, "rank"))


def test_heavy_tailed_scores_do_not_collapse_the_default():
    # RMD-like: lognormal bulk plus the 3,848 outlier measured on real features.
    rng = np.random.default_rng(1)
    s = np.r_[rng.lognormal(2.5, 1.0, 9999) - 10.0, 3848.0]
    default = map_scores(s)
    assert default.mapping == DEFAULT_MAPPING
    assert 0.1 <= default.mean_weight <= 0.7
    assert (default.weights > 0.1).mean() >= 0.5  # most samples take part
    assert default.weights.max() == 1.0
    for name in ("rank", "quantile", "robust-sigmoid"):
        robust = map_scores(s, name)
        assert robust.mean_weight > 0.1 and (robust.weights > 0.1).mean() > 0.3, name
    # The original formula, for the record: one weight ~1, the rest ~0 (plain CE).
    old = map_scores(s, "exp-max")
    assert old.mean_weight < 0.01 and (old.weights > 0.1).sum() == 1


def test_rank_mean_weight_is_known_in_advance():
    # mean of exp((u - 1) / T) over u uniform in (0, 1] -> T * (1 - exp(-1/T)), whatever the
    # scores: the average penalty alpha * mean(w) does not depend on the data.
    s = np.random.default_rng(2).standard_cauchy(20000)
    for t in (0.1, 0.3, 1.0):
        m = map_scores(s, "rank", temperature=t)
        assert m.mean_weight == pytest.approx(t * (1 - math.exp(-1 / t)), rel=1e-3)
        assert m.describe()["mean_weight"] == m.mean_weight == pytest.approx(m.weights.mean())


@pytest.mark.parametrize("name", MAPPING_NAMES)
def test_bounded_and_monotone(name):
    rng = np.random.default_rng(3)
    s = np.r_[np.round(rng.standard_t(2, 1000), 2), 1e4, -1e4]
    w = difficulty_weights(s, name)
    assert np.isfinite(w).all() and (w >= 0).all() and (w <= 1).all()
    order = np.argsort(s, kind="stable")
    assert (np.diff(w[order]) >= -1e-15).all()  # non-decreasing in the score
    assert set(MAPPING_PARAMS[name]) <= {"temperature", "low", "high"}


def test_bad_input_raises():
    with pytest.raises(ValueError, match="unknown weight mapping"):
        map_scores([0.0, 1.0], "softmax")
    with pytest.raises(ValueError, match="takes low, high"):
        map_scores([0.0, 1.0], "quantile", temperature=0.3)
    map_scores([0.0, 1.0], "quantile", temperature="auto")  # "auto" means "its default"
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature"):
            map_scores([0.0, 1.0], "rank", temperature=bad)
    with pytest.raises(ValueError, match="NaN"):
        map_scores([0.0, float("nan")])
    with pytest.raises(ValueError, match="non-empty"):
        map_scores([])


def test_loss_from_scores_uses_the_mapping():
    loss = DifficultyAwareLoss.from_scores([10.0, 30.0, 20.0, 40.0], alpha=0.5, mapping="rank",
                                           temperature=0.5)  # fmt: skip
    assert loss.weights.tolist() == pytest.approx(
        np.exp(np.array([-0.75, -0.25, -0.5, 0.0]) / 0.5).tolist(), rel=1e-6
    )
    # The default (quantile 0.05-0.95): 0..10 -> caps at 0.5 and 9.5.
    default = DifficultyAwareLoss.from_scores(np.arange(11.0))
    assert default.weights.tolist() == pytest.approx(np.clip((np.arange(11.0) - 0.5) / 9.0, 0, 1).tolist(),
                                                     rel=1e-6)  # fmt: skip
