"""Metrics pinned on hand-computed cases, and checked against torchmetrics / scikit-learn."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torchmetrics.classification import BinaryAUROC, MulticlassAccuracy, MulticlassCalibrationError

from trainer import metrics as M

# conf (0.9, 0.62, 0.7, 0.78): each in its own 15-bin bucket, none on a boundary.
PROBS = np.array([[0.9, 0.1], [0.62, 0.38], [0.3, 0.7], [0.22, 0.78]])
LABELS = np.array([0, 1, 1, 1])  # correct: yes, no, yes, yes


def test_accuracy_nll_brier():
    assert M.accuracy(PROBS, LABELS) == 0.75
    assert M.nll(PROBS, LABELS) == pytest.approx(
        -(math.log(0.9) + math.log(0.38) + math.log(0.7) + math.log(0.78)) / 4
    )
    # per sample sum_c (p - onehot)^2: 0.02, 2*0.62^2, 2*0.3^2, 2*0.22^2
    assert M.brier(PROBS, LABELS) == pytest.approx(
        (0.02 + 2 * 0.62**2 + 2 * 0.09 + 2 * 0.22**2) / 4
    )


def test_ece_hand_computed():
    assert M.ece(PROBS, LABELS) == pytest.approx((0.1 + 0.62 + 0.3 + 0.22) / 4)
    # Two samples in one bin: |mean acc - mean conf| weighted by 2/2.
    two = np.array([[0.71, 0.29], [0.72, 0.28]])
    assert M.ece(two, np.array([0, 1])) == pytest.approx(abs(0.5 - 0.715))
    bins = M.reliability_bins(PROBS, LABELS)
    assert bins["count"].sum() == 4 and bins["count"][13] == 1 and bins["count"][9] == 1


def test_adaptive_ece_hand_computed():
    # Sorted conf 0.62(wrong) 0.7 0.78 0.9 -> bins {0.62, 0.7}, {0.78, 0.9}.
    assert M.adaptive_ece(PROBS, LABELS, n_bins=2) == pytest.approx(
        (2 * abs(0.5 - 0.66) + 2 * abs(1 - 0.84)) / 4
    )
    assert M.adaptive_ece(PROBS, LABELS) == pytest.approx(M.ece(PROBS, LABELS))  # 1 sample per bin


def test_aurc_eaurc_hand_computed():
    # Ranked by conf: 0.9 ok, 0.78 ok, 0.7 ok, 0.62 wrong -> risks 0, 0, 0, 1/4.
    assert M.aurc(PROBS, LABELS) == pytest.approx(0.25 / 4)
    assert M.eaurc(PROBS, LABELS) == pytest.approx(0.0)
    # All labels 1: wrong at conf 0.9 and 0.62 -> errors in rank order 1, 0, 0, 1.
    labels = np.ones(4, dtype=int)
    assert M.aurc(PROBS, labels) == pytest.approx((1 + 1 / 2 + 1 / 3 + 2 / 4) / 4)
    assert M.eaurc(PROBS, labels) == pytest.approx(
        (1 + 1 / 2 + 1 / 3 + 2 / 4) / 4 - (0 + 0 + 1 / 3 + 2 / 4) / 4
    )


def test_misclassification_auroc_hand_computed():
    assert M.misclassification_auroc(PROBS, LABELS) == 1.0
    # correct {0.78, 0.7} vs wrong {0.9, 0.62}: 2 of 4 pairs ordered right.
    assert M.misclassification_auroc(PROBS, np.ones(4, dtype=int)) == 0.5
    assert math.isnan(M.misclassification_auroc(PROBS, PROBS.argmax(1)))  # no errors: undefined


def test_ood_auroc_and_fpr95_hand_computed():
    ind = np.array([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    ood = np.array([[0.85, 0.15], [0.5, 0.5]])
    assert M.ood_auroc(ind, ood) == pytest.approx(5 / 8)
    assert M.fpr_at_tpr(ind, ood, 0.95) == 0.5  # keep all 4 ID: threshold 0.6, 0.85 accepted
    assert M.fpr_at_tpr(ind, ood, 0.5) == 0.5  # threshold 0.8
    assert M.fpr_at_tpr(ind, ood, 0.25) == 0.0  # threshold 0.9
    assert M.auroc([1.0, 1.0, 0.0], [True, False, False]) == pytest.approx(0.75)  # tie counts half


def _random_case(n=2000, k=7, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, k)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    # Labels correlated with the prediction so every bin has a mix of right and wrong.
    labels = np.where(rng.random(n) < 0.6, probs.argmax(1), rng.integers(0, k, n))
    return probs, labels


def test_ece_agrees_with_torchmetrics():
    probs, labels = _random_case()
    ours = M.ece(probs, labels)
    ref = MulticlassCalibrationError(num_classes=7, n_bins=15, norm="l1")(
        torch.tensor(probs), torch.tensor(labels)
    ).item()
    assert ours == pytest.approx(ref, abs=1e-6)  # torchmetrics bins in float32


def test_accuracy_agrees_with_torchmetrics():
    probs, labels = _random_case(seed=1)
    ref = MulticlassAccuracy(num_classes=7, average="micro")(
        torch.tensor(probs), torch.tensor(labels)
    ).item()
    assert M.accuracy(probs, labels) == pytest.approx(ref, abs=1e-6)


def test_auroc_agrees_with_sklearn_and_torchmetrics():
    probs, labels = _random_case(seed=2)
    conf, correct = probs.max(1), probs.argmax(1) == labels
    ours = M.misclassification_auroc(probs, labels)
    assert ours == pytest.approx(roc_auc_score(correct, conf), abs=1e-12)
    assert ours == pytest.approx(
        BinaryAUROC()(torch.tensor(conf), torch.tensor(correct.astype(int))).item(), abs=1e-5
    )
    # Heavy ties: scores on a coarse grid.
    rng = np.random.default_rng(3)
    s, y = rng.integers(0, 4, 500).astype(float), rng.random(500) < 0.4
    assert M.auroc(s, y) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_ood_auroc_agrees_with_sklearn():
    ind, _ = _random_case(n=300, seed=4)
    ood, _ = _random_case(n=200, seed=5)
    ood = (ood + 0.5 / 7) / 1.5  # flatter: less confident
    y = np.r_[np.ones(300), np.zeros(200)]
    assert M.ood_auroc(ind, ood) == pytest.approx(
        roc_auc_score(y, np.r_[ind.max(1), ood.max(1)]), abs=1e-12
    )


def test_perfect_and_inputs():
    probs = np.eye(3)[[0, 1, 2, 1]]
    out = M.classification_metrics(probs, np.array([0, 1, 2, 1]))
    assert (
        out["accuracy"] == 1.0 and out["ece"] == 0.0 and out["brier"] == 0.0 and out["aurc"] == 0.0
    )
    assert M.accuracy(torch.tensor(probs), torch.tensor([0, 1, 2, 1])) == 1.0  # tensors accepted
    with pytest.raises(ValueError):
        M.accuracy(probs, np.array([0, 1]))
    with pytest.raises(ValueError):
        M.accuracy(probs, np.array([0, 1, 3, 1]))
