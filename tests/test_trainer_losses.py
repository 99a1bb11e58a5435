"""Losses pinned on hand-computed cases."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.losses import (
    ConfidencePenaltyLoss,
    CrossEntropyLoss,
    DifficultyAwareLoss,
    FocalLoss,
    LabelSmoothingLoss,
    build_loss,
    entropy,
)

# logits (ln 3, 0) -> p = (0.75, 0.25); logits (0, 0) -> p = (0.5, 0.5).
LOGITS = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]], dtype=torch.float64)
TARGETS = torch.tensor([0, 1])
H_75 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
LN2 = math.log(2.0)


def test_entropy_hand_computed_and_saturated():
    assert entropy(LOGITS).tolist() == pytest.approx([H_75, LN2])
    saturated = entropy(torch.tensor([[1000.0, -1000.0]]))
    assert torch.isfinite(saturated).all() and saturated.item() == pytest.approx(0.0, abs=1e-12)


def test_cross_entropy():
    per = CrossEntropyLoss().per_sample(LOGITS, TARGETS)
    assert per.tolist() == pytest.approx([-math.log(0.75), LN2])
    assert CrossEntropyLoss()(LOGITS, TARGETS).item() == pytest.approx((-math.log(0.75) + LN2) / 2)


def test_fused_mean_equals_mean_of_per_sample_values():
    # CE and label smoothing reduce inside torch's op; the mean must not change.
    logits = torch.randn(33, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(0, 7, (33,), generator=torch.Generator().manual_seed(1))
    for loss in (CrossEntropyLoss(), LabelSmoothingLoss(0.1)):
        expected = loss.per_sample(logits, targets).mean()
        assert loss(logits, targets).item() == pytest.approx(expected.item(), rel=1e-14)


def test_label_smoothing():
    # eps = 0.2, K = 2: target distribution (0.9, 0.1) for class 0.
    per = LabelSmoothingLoss(0.2).per_sample(LOGITS, TARGETS)
    assert per[0].item() == pytest.approx(-(0.9 * math.log(0.75) + 0.1 * math.log(0.25)))
    assert per[1].item() == pytest.approx(LN2)


def test_focal():
    per = FocalLoss(gamma=2.0).per_sample(LOGITS, TARGETS)
    assert per[0].item() == pytest.approx(-(0.25**2) * math.log(0.75))
    assert per[1].item() == pytest.approx(0.25 * LN2)
    # gamma = 0 is cross-entropy.
    assert torch.allclose(
        FocalLoss(0.0).per_sample(LOGITS, TARGETS), CrossEntropyLoss().per_sample(LOGITS, TARGETS)
    )


def test_confidence_penalty():
    per = ConfidencePenaltyLoss(beta=0.5).per_sample(LOGITS, TARGETS)
    assert per.tolist() == pytest.approx([-math.log(0.75) - 0.5 * H_75, LN2 - 0.5 * LN2])


def test_difficulty_aware_loss_looks_up_by_index():
    # scores (0, 1, 2), original mapping with T = 1 -> weights (e^-2, e^-1, 1); batch = samples
    # 2 and 0. (The mappings themselves: tests/test_trainer_weights.py.)
    loss = DifficultyAwareLoss.from_scores(
        [0.0, 1.0, 2.0], alpha=0.5, mapping="exp-max", temperature=1.0
    ).double()
    per = loss.per_sample(LOGITS, TARGETS, torch.tensor([2, 0]))
    expected = [-math.log(0.75) - 0.5 * 1.0 * H_75, LN2 - 0.5 * math.exp(-2.0) * LN2]
    assert per.tolist() == pytest.approx(expected, rel=1e-6)
    assert loss(LOGITS, TARGETS, torch.tensor([2, 0])).item() == pytest.approx(
        sum(expected) / 2, rel=1e-6
    )


def test_difficulty_aware_loss_limits_and_errors():
    zero = DifficultyAwareLoss([1.0, 1.0], alpha=0.0)
    idx = torch.tensor([0, 1])
    assert torch.allclose(
        zero.per_sample(LOGITS.float(), TARGETS, idx),
        CrossEntropyLoss().per_sample(LOGITS.float(), TARGETS),
    )
    # All weights 1 = constant entropy regularisation with beta = alpha.
    ones = DifficultyAwareLoss([1.0, 1.0], alpha=0.3)
    assert torch.allclose(
        ones.per_sample(LOGITS.float(), TARGETS, idx),
        ConfidencePenaltyLoss(0.3).per_sample(LOGITS.float(), TARGETS),
    )
    with pytest.raises(ValueError, match="indices"):
        ones(LOGITS, TARGETS)
    with pytest.raises(ValueError):
        DifficultyAwareLoss([], alpha=1.0)
    with pytest.raises(ValueError):
        DifficultyAwareLoss([1.0], alpha=-1.0)


def test_difficulty_loss_raises_entropy_of_hard_samples():
    # One gradient step on a hard sample's logits: the entropy term pushes them apart less than
    # plain CE does, so the resulting prediction is less confident.
    logits0 = torch.tensor([[2.0, 0.0, 0.0]])
    target = torch.tensor([0])

    def step(loss_fn):
        logits = logits0.clone().requires_grad_(True)
        loss_fn(logits, target, torch.tensor([0])).backward()
        return torch.softmax(logits - 1.0 * logits.grad, -1).max().item()

    assert step(DifficultyAwareLoss([1.0], alpha=1.0)) < step(CrossEntropyLoss())


def test_build_loss_names():
    assert isinstance(build_loss("ce"), CrossEntropyLoss)
    assert isinstance(build_loss("ls", smoothing=0.05), LabelSmoothingLoss)
    assert isinstance(build_loss("focal"), FocalLoss)
    assert isinstance(build_loss("er"), ConfidencePenaltyLoss)
    assert isinstance(build_loss("difficulty", weights=np.ones(3)), DifficultyAwareLoss)
    with pytest.raises(ValueError):
        build_loss("difficulty")
    with pytest.raises(ValueError):
        build_loss("nope")


def test_weights_follow_module_device_and_dtype():
    loss = DifficultyAwareLoss([0.5, 1.0], alpha=1.0)
    assert "weights" in dict(loss.named_buffers())  # so .to()/.double() move them with the module
    loss.double()
    assert loss.weights.dtype == torch.float64
    idx = torch.tensor([1, 0])
    out = loss.per_sample(LOGITS, TARGETS, idx)  # float64 logits
    assert out.dtype == torch.float64
    # CE - alpha * w * H, by hand: sample 0 has p = (0.75, 0.25), target 0, weight 1.0;
    # sample 1 has p = (0.5, 0.5), weight 0.5.
    expected = [-math.log(0.75) - 1.0 * H_75, LN2 - 0.5 * LN2]
    assert out.tolist() == pytest.approx(expected, rel=1e-12)


def test_difficulty_aware_gradient_matches_autograd_reference():
    # The loss and its gradient against autograd through the plain formula (CE and the
    # separately computed entropy), and gradcheck.
    torch.manual_seed(0)
    logits = (torch.randn(6, 5, dtype=torch.float64) * 3).requires_grad_(True)
    targets = torch.tensor([0, 4, 2, 2, 1, 3])
    weights = torch.rand(10, dtype=torch.float64)
    idx = torch.tensor([9, 0, 3, 3, 7, 1])
    loss = DifficultyAwareLoss(weights, alpha=0.7).double()
    ours = loss(logits, targets, idx)
    (g_ours,) = torch.autograd.grad(ours, logits)
    w = weights.float().double()[idx]  # the buffer holds float32
    ref = (F.cross_entropy(logits, targets, reduction="none") - 0.7 * w * entropy(logits)).mean()
    (g_ref,) = torch.autograd.grad(ref, logits)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-12)
    assert torch.allclose(g_ours, g_ref, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda z: loss.per_sample(z, targets, idx), (logits.detach().requires_grad_(True),)
    )


def test_difficulty_aware_weight_lookup_and_saturated_logits():
    # Each row's weight is the table entry its index names (repeats allowed); an index past the
    # table raises instead of reading another sample's weight.
    weights = torch.tensor([0.0, 1.0, 0.25])
    loss = DifficultyAwareLoss(weights, alpha=2.0)
    logits = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    targets = torch.tensor([0, 1, 0])
    out = loss.per_sample(logits, targets, torch.tensor([1, 1, 2]))
    assert out.tolist() == pytest.approx([LN2 - 2.0 * LN2, LN2 - 2.0 * LN2, LN2 - 0.5 * LN2])
    assert loss.per_sample(
        logits, targets, torch.tensor([1, 1, 2], dtype=torch.int32)
    ).tolist() == (pytest.approx(out.tolist()))
    with pytest.raises(IndexError):
        loss.per_sample(logits, targets, torch.tensor([0, 1, 3]))
    # Saturated logits (p = 1 on the target): entropy 0, loss 0, finite gradient (no 0 * log 0).
    z = torch.tensor([[1000.0, -1000.0], [-1000.0, 1000.0]], requires_grad=True)
    value = loss(z, torch.tensor([0, 1]), torch.tensor([1, 1]))
    (grad,) = torch.autograd.grad(value, z)
    assert value.item() == 0.0 and torch.isfinite(grad).all()
