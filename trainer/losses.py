"""Training losses, all ``torch.nn.Module`` with one signature: ``loss(logits, targets, indices)``.

``indices`` are positions in the training set (what :class:`trainer.data.ScoredDataset` yields);
only the difficulty-aware loss uses them, the others accept and ignore them so a training loop
can swap losses without changing a line.

Difficulty-aware entropy regularisation (Cui et al. 2023; docs/method.md): per sample
``CE(p_i, y_i) - alpha * w_i * H(p_i)`` with ``w_i = g(s_i)`` in [0, 1] from the difficulty
scores (:mod:`trainer.weights`; default: min-max between the 5th and 95th percentiles); hard samples (large score s) get their
predictive entropy pushed up, i.e. their over-confidence penalised.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.kernels import difficulty_aware_loss_cpu
from trainer.weights import DEFAULT_MAPPING, difficulty_weights

# The default strength: with the default mapping, the alpha of {0.3, 1, 3} with the lowest mean
# validation-NLL regret over the benchmark's regimes (docs/trainer.md).
DEFAULT_ALPHA = 1.0


def entropy(logits: Tensor) -> Tensor:
    """Predictive entropy ``H(softmax(logits))`` per row, computed from log-probabilities so that
    saturated logits give 0 (not NaN from ``0 * log 0``)."""
    log_p = F.log_softmax(logits, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


class SampleLoss(nn.Module):
    """Mean over the batch of a per-sample loss."""

    def per_sample(self, logits: Tensor, targets: Tensor, indices: Tensor | None) -> Tensor:
        raise NotImplementedError

    def forward(self, logits: Tensor, targets: Tensor, indices: Tensor | None = None) -> Tensor:
        return self.per_sample(logits, targets, indices).mean()


class CrossEntropyLoss(SampleLoss):
    def per_sample(self, logits: Tensor, targets: Tensor, indices: Tensor | None = None) -> Tensor:
        return F.cross_entropy(logits, targets, reduction="none")

    def forward(self, logits: Tensor, targets: Tensor, indices: Tensor | None = None) -> Tensor:
        # torch's own mean reduction: what a user's CE baseline writes, and ~3% faster on a
        # small CPU step than per-sample values plus a separate mean (docs/trainer.md).
        return F.cross_entropy(logits, targets)


class LabelSmoothingLoss(SampleLoss):
    """CE against ``(1 - eps) * onehot + eps / K`` (Szegedy et al.; torch's convention)."""

    def __init__(self, smoothing: float = 0.1) -> None:
        super().__init__()
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = smoothing

    def per_sample(self, logits: Tensor, targets: Tensor, indices: Tensor | None = None) -> Tensor:
        return F.cross_entropy(logits, targets, reduction="none", label_smoothing=self.smoothing)

    def forward(self, logits: Tensor, targets: Tensor, indices: Tensor | None = None) -> Tensor:
        return F.cross_entropy(logits, targets, label_smoothing=self.smoothing)


class FocalLoss(SampleLoss):
    """``-(1 - p_y)^gamma * log p_y`` (Lin et al. 2017; Mukhoti et al. 2020 for calibration)."""

    def __init__(self, gamma: float = 3.0) -> None:
        super().__init__()
        if gamma < 0:
            raise ValueError(f"gamma must be >= 0, got {gamma}")
        self.gamma = gamma

    def per_sample(self, logits: Tensor, targets: Tensor, indices: Tensor | None = None) -> Tensor:
        log_p_y = F.log_softmax(logits, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1)
        return -((1 - log_p_y.exp()) ** self.gamma) * log_p_y


class ConfidencePenaltyLoss(SampleLoss):
    """Constant entropy regularisation ``CE - beta * H(p)`` (Pereyra et al. 2017): the same
    penalty on every sample; the baseline the difficulty-aware loss refines."""

    def __init__(self, beta: float = 0.1) -> None:
        super().__init__()
        self.beta = beta

    def per_sample(self, logits: Tensor, targets: Tensor, indices: Tensor | None = None) -> Tensor:
        return F.cross_entropy(logits, targets, reduction="none") - self.beta * entropy(logits)


class DifficultyAwareLoss(SampleLoss):
    """``CE - alpha * w_i * H(p_i)`` with per-sample weights looked up by training-set index.

    The weight table is a buffer (moves with ``.to(device)``), computed once. On the CPU the
    batch loss is one compiled pass (:mod:`trainer.kernels`): built from torch ops it made a
    small MLP's step 1.12-1.16x cross-entropy's, fused 1.02-1.04x (docs/trainer.md, "Step
    time"). Elsewhere (a GPU, other dtypes) and for :meth:`per_sample`, torch ops: one
    ``index_select`` (a third of ``weights[indices]``'s cost) and an entropy that shares CE's
    log-softmax.
    """

    weights: Tensor

    def __init__(
        self, weights: Tensor | np.ndarray | Sequence[float], alpha: float = DEFAULT_ALPHA
    ) -> None:
        super().__init__()
        w = torch.as_tensor(np.asarray(weights, dtype=np.float32))
        if w.ndim != 1 or w.numel() == 0:
            raise ValueError("weights must be a non-empty 1-d table (one per training sample)")
        if not torch.isfinite(w).all() or (w < 0).any():
            raise ValueError("weights must be finite and non-negative")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.register_buffer("weights", w)
        self.alpha = float(alpha)

    @classmethod
    def from_scores(
        cls,
        scores: Sequence[float] | np.ndarray,
        alpha: float = DEFAULT_ALPHA,
        mapping: str = DEFAULT_MAPPING,
        **params: Any,
    ) -> DifficultyAwareLoss:
        """Weights from the scores of every training sample, in training-set order, by the
        named mapping of :mod:`trainer.weights` (``params``: its temperature or quantiles)."""
        return cls(difficulty_weights(scores, mapping, **params), alpha=alpha)

    def forward(self, logits: Tensor, targets: Tensor, indices: Tensor | None = None) -> Tensor:
        if indices is None:
            raise _missing_indices()
        fused = difficulty_aware_loss_cpu(logits, targets, self.weights, indices, self.alpha)
        if fused is None:
            return self.per_sample(logits, targets, indices).mean()
        return fused

    def per_sample(self, logits: Tensor, targets: Tensor, indices: Tensor | None = None) -> Tensor:
        if indices is None:
            raise _missing_indices()
        if indices.device != self.weights.device:
            indices = indices.to(self.weights.device)
        w = self.weights.index_select(0, indices)
        if w.dtype != logits.dtype:
            w = w.to(logits.dtype)
        log_p = F.log_softmax(logits, dim=-1)
        # CE - alpha * w * H = -log p_y + alpha * w * sum_k p_k log p_k, from one log-softmax.
        neg_entropy = (log_p.exp() * log_p).sum(dim=-1)
        ce = F.nll_loss(log_p, targets, reduction="none")
        return torch.addcmul(ce, w, neg_entropy, value=self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, n={self.weights.numel()}"


def _missing_indices() -> ValueError:
    return ValueError(
        "DifficultyAwareLoss needs the batch's sample indices: wrap the dataset in "
        "trainer.data.ScoredDataset and pass its third item to the loss"
    )


LOSS_NAMES = ("ce", "ls", "focal", "er", "difficulty")


def build_loss(
    name: str,
    *,
    smoothing: float = 0.1,
    gamma: float = 3.0,
    beta: float = 0.1,
    alpha: float = DEFAULT_ALPHA,
    weights: np.ndarray | None = None,
) -> SampleLoss:
    """Loss by its command-line name; ``weights`` (one per training sample) for ``difficulty``."""
    if name == "ce":
        return CrossEntropyLoss()
    if name == "ls":
        return LabelSmoothingLoss(smoothing)
    if name == "focal":
        return FocalLoss(gamma)
    if name == "er":
        return ConfidencePenaltyLoss(beta)
    if name == "difficulty":
        if weights is None:
            raise ValueError("the difficulty-aware loss needs difficulty scores (weights)")
        return DifficultyAwareLoss(weights, alpha=alpha)
    raise ValueError(f"unknown loss {name!r}; choose one of {', '.join(LOSS_NAMES)}")
