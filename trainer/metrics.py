"""Accuracy, calibration, selective-classification and OOD metrics on predicted probabilities.

All functions take ``probs`` (N x K, rows summing to 1) and integer ``labels`` (N,), as numpy
arrays or tensors, and compute in float64 numpy: evaluation sets are small next to training,
and exact, dependency-free numbers are easier to pin in tests than fast ones.

Conventions (stated because papers differ):
- ECE: top-label, 15 equal-width confidence bins ``(lo, hi]`` (the first bin also takes 0),
  L1 gap weighted by bin mass; agrees with ``torchmetrics`` MulticlassCalibrationError(l1).
- Adaptive ECE: 15 equal-mass bins over samples sorted by confidence.
- Brier: ``mean_i sum_c (p_ic - 1[y_i = c])^2`` (range [0, 2]).
- AURC: area under the risk-coverage curve, ranking by confidence (max probability), risk =
  0/1 error, averaged over the N coverages k/N; E-AURC = AURC - AURC of the ideal ranking.
- Misclassification AUROC: how well confidence separates correct (positive) from wrong
  predictions; the same number as "error positive, score = -confidence".
- OOD AUROC / FPR@95: in-distribution is the positive class, score = max softmax probability;
  FPR@95 = fraction of OOD samples accepted at the threshold that keeps 95% of ID samples.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import rankdata

N_BINS = 15


def _as_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def _check(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p = _as_numpy(probs).astype(np.float64)
    y = _as_numpy(labels).astype(np.int64)
    if p.ndim != 2 or y.ndim != 1 or p.shape[0] != y.shape[0] or p.shape[0] == 0:
        raise ValueError(f"expected probs (N, K) and labels (N,), got {p.shape} and {y.shape}")
    if (y < 0).any() or (y >= p.shape[1]).any():
        raise ValueError("labels out of range for the number of classes")
    return p, y


def accuracy(probs: Any, labels: Any) -> float:
    p, y = _check(probs, labels)
    return float((p.argmax(1) == y).mean())


def nll(probs: Any, labels: Any, eps: float = 1e-12) -> float:
    """Mean negative log-likelihood of the true class (probabilities clipped at ``eps``)."""
    p, y = _check(probs, labels)
    return float(-np.log(np.clip(p[np.arange(len(y)), y], eps, None)).mean())


def brier(probs: Any, labels: Any) -> float:
    p, y = _check(probs, labels)
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return float(((p - onehot) ** 2).sum(1).mean())


def _confidence_correct(probs: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    p, y = _check(probs, labels)
    return p.max(1), (p.argmax(1) == y).astype(np.float64)


def reliability_bins(probs: Any, labels: Any, n_bins: int = N_BINS) -> dict[str, np.ndarray]:
    """Per equal-width bin: edges, count, mean confidence, accuracy (NaN where empty)."""
    conf, correct = _confidence_correct(probs, labels)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # (lo, hi]: searchsorted(..., "left") puts conf == hi into the bin ending at hi; 0 -> bin 0.
    index = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(index, minlength=n_bins).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, weights=conf, minlength=n_bins) / count
        acc = np.bincount(index, weights=correct, minlength=n_bins) / count
    return {"edges": edges, "count": count, "confidence": mean_conf, "accuracy": acc}


def ece(probs: Any, labels: Any, n_bins: int = N_BINS) -> float:
    bins = reliability_bins(probs, labels, n_bins)
    filled = bins["count"] > 0
    gap = np.abs(bins["accuracy"][filled] - bins["confidence"][filled])
    return float((gap * bins["count"][filled]).sum() / bins["count"].sum())


def adaptive_ece(probs: Any, labels: Any, n_bins: int = N_BINS) -> float:
    """ECE with equal-mass bins (Nixon et al. 2019): each bin holds ~N/n_bins samples."""
    conf, correct = _confidence_correct(probs, labels)
    order = np.argsort(conf, kind="stable")
    total = 0.0
    for chunk in np.array_split(order, min(n_bins, len(order))):
        total += abs(correct[chunk].mean() - conf[chunk].mean()) * len(chunk)
    return float(total / len(order))


def _aurc_from_errors(errors_in_rank_order: np.ndarray) -> float:
    n = len(errors_in_rank_order)
    risks = np.cumsum(errors_in_rank_order) / np.arange(1, n + 1)
    return float(risks.mean())


def aurc(probs: Any, labels: Any) -> float:
    """Area under the risk-coverage curve (Geifman et al. 2019); lower is better.

    Samples are accepted most confident first (stable order on ties); the risk at coverage
    k/N is the error rate of the k accepted samples; AURC is the mean over k = 1..N.
    """
    conf, correct = _confidence_correct(probs, labels)
    order = np.argsort(-conf, kind="stable")
    return _aurc_from_errors(1.0 - correct[order])


def eaurc(probs: Any, labels: Any) -> float:
    """Excess AURC: AURC minus that of an oracle that accepts every correct sample first."""
    _, correct = _confidence_correct(probs, labels)
    ideal = np.sort(1.0 - correct)  # all zeros (correct) first
    return aurc(probs, labels) - _aurc_from_errors(ideal)


def auroc(scores: Any, positive: Any) -> float:
    """AUROC of ``scores`` for the binary ``positive`` mask: P(score_pos > score_neg) with ties
    counted half (Mann-Whitney); equals scikit-learn's ``roc_auc_score``."""
    s = _as_numpy(scores).astype(np.float64)
    pos = _as_numpy(positive).astype(bool)
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")  # undefined with one class; NaN rather than a misleading number
    ranks = rankdata(s, method="average")  # ties share their average rank
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def misclassification_auroc(probs: Any, labels: Any) -> float:
    conf, correct = _confidence_correct(probs, labels)
    return auroc(conf, correct.astype(bool))


def ood_auroc(probs_in: Any, probs_out: Any) -> float:
    """ID (positive) vs OOD by maximum softmax probability."""
    conf_in = _as_numpy(probs_in).astype(np.float64).max(1)
    conf_out = _as_numpy(probs_out).astype(np.float64).max(1)
    scores = np.r_[conf_in, conf_out]
    positive = np.r_[np.ones(len(conf_in), bool), np.zeros(len(conf_out), bool)]
    return auroc(scores, positive)


def fpr_at_tpr(probs_in: Any, probs_out: Any, tpr: float = 0.95) -> float:
    """Fraction of OOD samples whose confidence reaches the threshold that accepts ``tpr`` of the
    ID samples (threshold = the ID confidence at the (1 - tpr) quantile, taken conservatively:
    the largest threshold that still keeps at least ``tpr`` of ID)."""
    conf_in = np.sort(_as_numpy(probs_in).astype(np.float64).max(1))
    conf_out = _as_numpy(probs_out).astype(np.float64).max(1)
    if len(conf_in) == 0 or len(conf_out) == 0:
        return float("nan")
    keep = int(np.ceil(tpr * len(conf_in)))
    threshold = conf_in[len(conf_in) - keep]  # accepting conf >= threshold keeps >= keep IDs
    return float((conf_out >= threshold).mean())


def classification_metrics(probs: Any, labels: Any) -> dict[str, float]:
    return {
        "accuracy": accuracy(probs, labels),
        "nll": nll(probs, labels),
        "brier": brier(probs, labels),
        "ece": ece(probs, labels),
        "adaptive_ece": adaptive_ece(probs, labels),
        "aurc": aurc(probs, labels),
        "eaurc": eaurc(probs, labels),
        "misclassification_auroc": misclassification_auroc(probs, labels),
    }


def ood_metrics(probs_in: Any, probs_out: Any) -> dict[str, float]:
    return {
        "ood_auroc": ood_auroc(probs_in, probs_out),
        "fpr_at_95_tpr": fpr_at_tpr(probs_in, probs_out),
    }
