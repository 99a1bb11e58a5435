"""The compiled CPU difficulty-aware loss against a float64 reference built from torch ops."""

import pytest
import torch
import torch.nn.functional as F

from trainer.kernels import difficulty_aware_loss_cpu
from trainer.losses import DifficultyAwareLoss, entropy


def reference(logits, targets, table, indices, alpha):
    """The plain formula in float64 autograd: mean(CE - alpha * w * H)."""
    z = logits.detach().double().requires_grad_(True)
    w = table.double()[indices]
    value = (F.cross_entropy(z, targets, reduction="none") - alpha * w * entropy(z)).mean()
    (grad,) = torch.autograd.grad(value, z)
    return value.item(), grad


def fused(logits, targets, table, indices, alpha):
    z = logits.detach().clone().requires_grad_(True)
    value = difficulty_aware_loss_cpu(z, targets, table, indices, alpha)
    (grad,) = torch.autograd.grad(value, z)
    return value, grad


def case(rows, classes, scale, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, classes, generator=g, dtype=torch.float64) * scale).to(dtype)
    targets = torch.randint(0, classes, (rows,), generator=g)
    table = torch.rand(50, generator=g)
    indices = torch.randint(0, 50, (rows,), generator=g)  # repeats on purpose
    return logits, targets, table, indices


@pytest.mark.parametrize(
    "rows,classes,scale",
    [(128, 10, 1.0), (7, 3, 30.0), (64, 100, 5.0), (5, 1000, 0.1), (3, 2, 1e3), (4, 1, 1.0)],
)
def test_float64_matches_reference(rows, classes, scale):
    logits, targets, table, indices = case(rows, classes, scale, seed=rows * classes)
    value, grad = fused(logits, targets, table, indices, 0.7)
    ref_value, ref_grad = reference(logits, targets, table, indices, 0.7)
    assert value.dtype == torch.float64
    assert value.item() == pytest.approx(ref_value, rel=1e-12, abs=1e-12)
    assert torch.allclose(grad, ref_grad, rtol=1e-10, atol=1e-14)


def test_float32_within_float32_rounding_of_reference():
    logits, targets, table, indices = case(128, 10, 4.0, seed=3, dtype=torch.float32)
    value, grad = fused(logits, targets, table, indices, 1.0)
    ref_value, ref_grad = reference(logits, targets, table, indices, 1.0)
    assert value.dtype == grad.dtype == torch.float32
    assert value.item() == pytest.approx(ref_value, rel=1e-6)
    assert torch.allclose(grad.double(), ref_grad, atol=1e-7)


def test_ill_conditioned_rows():
    # Saturated rows (p = 1 on the target, on another class), a row of ties, and a row whose
    # logits sit at 1e4 with a spread of 1e-3: every value finite and equal to the reference.
    logits = torch.tensor(
        [
            [1000.0, -1000.0, 0.0],
            [-1000.0, 1000.0, 0.0],
            [5.0, 5.0, 5.0],
            [1e4, 1e4 + 1e-3, 1e4 - 1e-3],
        ],
        dtype=torch.float64,
    )
    targets = torch.tensor([0, 0, 2, 1])
    table = torch.tensor([1.0, 0.5, 0.0, 0.25])
    indices = torch.tensor([0, 1, 2, 3])
    value, grad = fused(logits, targets, table, indices, 2.0)
    ref_value, ref_grad = reference(logits, targets, table, indices, 2.0)
    assert torch.isfinite(grad).all()
    assert value.item() == pytest.approx(ref_value, rel=1e-12)
    assert torch.allclose(grad, ref_grad, atol=1e-12)
    # The second row is confidently wrong: its loss is the 2000 logit gap (over 4 rows).
    assert value.item() > 2000.0 / 4


def test_row_permutation_and_layout_invariance():
    logits, targets, table, indices = case(32, 10, 3.0, seed=5)
    value, grad = fused(logits, targets, table, indices, 1.0)
    order = torch.randperm(32, generator=torch.Generator().manual_seed(6))
    value_p, grad_p = fused(logits[order], targets[order], table, indices[order], 1.0)
    assert value_p.item() == pytest.approx(value.item(), rel=1e-13)
    assert torch.allclose(grad_p, grad[order], atol=1e-15)
    # A transposed (non-contiguous) view holds the same numbers.
    strided = logits.t().contiguous().t()
    assert not strided.is_contiguous()
    value_s, grad_s = fused(strided, targets, table, indices, 1.0)
    assert value_s.item() == value.item() and torch.equal(grad_s, grad)


def test_chain_rule_and_accumulation():
    logits, targets, table, indices = case(16, 4, 2.0, seed=7)
    _, grad = fused(logits, targets, table, indices, 1.0)
    z = logits.clone().requires_grad_(True)
    (3.0 * difficulty_aware_loss_cpu(z, targets, table, indices, 1.0)).backward()
    difficulty_aware_loss_cpu(z, targets, table, indices, 1.0).backward()
    assert torch.allclose(z.grad, 4.0 * grad, atol=1e-14)


def test_out_of_range_targets_and_indices_raise():
    logits, targets, table, indices = case(4, 3, 1.0, seed=8)
    for bad in (3, -1):
        with pytest.raises(IndexError, match=f"Target {bad}"):
            difficulty_aware_loss_cpu(logits, torch.tensor([0, bad, 1, 2]), table, indices, 1.0)
    for bad in (50, -1):
        with pytest.raises(IndexError, match=f"sample index {bad}"):
            difficulty_aware_loss_cpu(logits, targets, table, torch.tensor([0, 1, bad, 2]), 1.0)


def test_double_backward_is_refused_not_wrong():
    logits, targets, table, indices = case(4, 3, 1.0, seed=9)
    z = logits.clone().requires_grad_(True)
    value = difficulty_aware_loss_cpu(z, targets, table, indices, 1.0)
    with pytest.raises(RuntimeError, match="no double backward"):
        torch.autograd.grad(value, z, create_graph=True)
    # The torch-ops path gives second derivatives, as the error says.
    loss = DifficultyAwareLoss(table, alpha=1.0)
    (grad,) = torch.autograd.grad(loss.per_sample(z, targets, indices).mean(), z, create_graph=True)
    (hessian_row,) = torch.autograd.grad(grad[0, 0], z)
    assert hessian_row.abs().sum() > 0


def test_module_takes_the_kernel_on_cpu_and_torch_ops_elsewhere():
    logits, targets, _, indices = case(16, 10, 2.0, seed=10, dtype=torch.float32)
    loss = DifficultyAwareLoss(torch.rand(50, generator=torch.Generator().manual_seed(11)))
    z = logits.clone().requires_grad_(True)
    out = loss(z, targets, indices)
    assert "DifficultyAwareCPU" in type(out.grad_fn).__name__
    # int32 indices, a float16 input, 1-d targets missing: the torch-ops path (the same values).
    assert difficulty_aware_loss_cpu(logits, targets, loss.weights, indices.int(), 1.0) is None
    assert difficulty_aware_loss_cpu(logits.half(), targets, loss.weights, indices, 1.0) is None
    assert difficulty_aware_loss_cpu(logits, targets[:, None], loss.weights, indices, 1.0) is None
    via_ops = loss(z, targets, indices.int())
    assert "DifficultyAwareCPU" not in type(via_ops.grad_fn).__name__
    assert via_ops.item() == pytest.approx(out.item(), rel=1e-6)
    (g_kernel,) = torch.autograd.grad(out, z)
    (g_ops,) = torch.autograd.grad(via_ops, z)
    assert torch.allclose(g_kernel, g_ops, atol=1e-7)
    # A float64 table (loss.double()) with float32 logits still runs on the kernel.
    mixed = loss.double()(z, targets, indices)
    assert "DifficultyAwareCPU" in type(mixed.grad_fn).__name__
    assert mixed.item() == pytest.approx(out.item(), rel=1e-6)


def test_batch_size_mismatch_and_empty_batch():
    logits, targets, table, indices = case(4, 3, 1.0, seed=12)
    with pytest.raises(ValueError, match="batch sizes differ"):
        difficulty_aware_loss_cpu(logits, targets[:3], table, indices, 1.0)
    with pytest.raises(ValueError, match="batch sizes differ"):
        difficulty_aware_loss_cpu(logits, targets, table, torch.cat([indices, indices]), 1.0)
    # An empty batch: NaN, as torch's mean of an empty batch.
    empty = difficulty_aware_loss_cpu(logits[:0], targets[:0], table, indices[:0], 1.0)
    assert torch.isnan(empty)


def test_compiles_without_a_writable_cache(monkeypatch):
    # An install where neither the package folder nor a home cache is writable (a read-only
    # container): numba refuses cache=True at decoration; the kernel compiles per process.
    import numba.core.caching

    from trainer import kernels

    monkeypatch.setattr(numba.core.caching.CacheImpl, "_locator_classes", [])
    kernels._compiled.cache_clear()
    try:
        assert type(kernels._compiled()._cache).__name__ == "NullCache"  # compiled, not cached
        logits, targets, table, indices = case(8, 10, 1.0, seed=13)
        value, _ = fused(logits, targets, table, indices, 1.0)
        assert value.item() == pytest.approx(reference(logits, targets, table, indices, 1.0)[0])
    finally:
        kernels._compiled.cache_clear()


def test_tensors_off_the_cpu_take_the_torch_ops_path():
    # What a GPU gets, shown on the meta device (shapes without data): never the numpy kernel.
    loss = DifficultyAwareLoss(torch.rand(50)).to("meta")
    logits = torch.empty(8, 10, device="meta", requires_grad=True)
    targets = torch.zeros(8, dtype=torch.int64, device="meta")
    indices = torch.zeros(8, dtype=torch.int64, device="meta")
    assert difficulty_aware_loss_cpu(logits, targets, loss.weights, indices, 1.0) is None
    out = loss(logits, targets, indices)
    assert out.device.type == "meta" and "DifficultyAwareCPU" not in type(out.grad_fn).__name__
