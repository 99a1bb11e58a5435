"""The difficulty-aware loss and its gradient in one compiled pass over the logits, for the CPU.

Why a compiled kernel: on a small model's CPU step (an MLP on Fashion-MNIST, ~1 ms) the loss
built from torch ops runs about 20 small kernels forward and backward, each a few microseconds
of dispatch, and torch's CPU log-softmax takes a slow path for 10 classes (~20 us for 128 x 10,
more than for 128 x 100). Together they made the step 1.12-1.16x cross-entropy's; with this
kernel it is 1.02-1.04x (docs/trainer.md, "Step time"). The kernel reads each row once, writes
the loss and the gradient in the same pass (the backward only scales the stored gradient), and
gathers the rows' weights from the table itself.

What it gives up: double backward (the gradient is a stored array, not a graph), and
``torch.compile`` breaks its graph here. :class:`trainer.losses.DifficultyAwareLoss` uses it
only for 2-d float32/float64 logits on the CPU; everything else takes the torch-ops path,
which computes the same values (tests/test_trainer_kernels.py holds both to a float64
reference).

numba is imported on first use, so importing :mod:`trainer` does not pay for it.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np
import torch
from torch import Tensor

KERNEL_DTYPES = (torch.float32, torch.float64)
# The kernel's status codes (module constants, which numba compiles in as literals).
OK, LENGTHS, BAD_TARGET, BAD_INDEX = 0, 1, 2, 3


def _loss_and_grad(
    logits: np.ndarray,
    targets: np.ndarray,
    table: np.ndarray,
    indices: np.ndarray,
    alpha: float,
    grad: np.ndarray,
) -> tuple[float, int, int]:
    """Mean over rows of ``-log p_y + alpha * w * sum_k p_k log p_k``; ``grad`` receives
    its gradient wrt the logits. Returns ``(loss, status, row)``: numba cannot raise an
    error that carries a value, so the caller raises it from the status and row."""
    n_rows, n_classes = logits.shape
    if targets.shape[0] != n_rows or indices.shape[0] != n_rows:
        return 0.0, LENGTHS, -1
    if n_rows == 0:
        return np.nan, OK, -1  # the mean of nothing, as torch's reductions give
    n_table = table.shape[0]
    scale = 1.0 / n_rows
    # Checks and the weight gather first, in a loop of independent loads: the table
    # (one entry per training sample) is mostly out of cache after the model's step, and
    # here its misses overlap instead of stalling each row in turn.
    weights = np.empty(n_rows)
    for i in range(n_rows):
        y = targets[i]
        if y < 0 or y >= n_classes:
            return 0.0, BAD_TARGET, i
        j = indices[i]
        if j < 0 or j >= n_table:
            return 0.0, BAD_INDEX, i
        weights[i] = alpha * table[j]
    total = 0.0
    for i in range(n_rows):
        y = targets[i]
        row = logits[i]
        out = grad[i]
        top = row[0]
        for k in range(1, n_classes):
            if row[k] > top:
                top = row[k]
        # Exponentials stored in the gradient row, reused below: one exp per element.
        sum_exp = row[0] * 0
        for k in range(n_classes):
            e = np.exp(row[k] - top)
            out[k] = e
            sum_exp += e
        log_norm = top + np.log(sum_exp)
        inv = 1.0 / sum_exp
        # sum_k p_k log p_k, with log p_k = z_k - log_norm: 0 for a saturated row, never
        # 0 * log 0.
        neg_entropy = row[0] * 0
        for k in range(n_classes):
            neg_entropy += out[k] * inv * (row[k] - log_norm)
        weight = weights[i]
        # d/dz_k = p_k (1 + alpha w (log p_k - sum p log p)) - [k == y]
        for k in range(n_classes):
            p = out[k] * inv
            out[k] = p * (1.0 + weight * (row[k] - log_norm - neg_entropy)) * scale
        out[y] -= scale
        total += (log_norm - row[y]) + weight * neg_entropy
    return total * scale, OK, -1


@cache
def _compiled() -> Any:
    import numba

    try:
        # The machine code is cached next to this file, or in the user's cache directory
        # where that is read-only, so only a machine's first process compiles (~1 s).
        return numba.njit(nogil=True, cache=True)(_loss_and_grad)
    except RuntimeError:  # no writable cache location at all: compile in every process
        return numba.njit(nogil=True)(_loss_and_grad)


class _DifficultyAwareCPU(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, logits: Tensor, targets: Tensor, table: Tensor, indices: Tensor, alpha: float
    ) -> Tensor:
        grad = torch.empty_like(logits)
        # Any strides: numba compiles a specialisation per layout, so no copies here.
        loss, status, row = _compiled()(
            logits.numpy(), targets.numpy(), table.numpy(), indices.numpy(), alpha, grad.numpy()
        )
        if status != OK:
            raise _kernel_error(status, row, logits, targets, table, indices)
        # An attribute, not save_for_backward: the gradient is this function's own tensor,
        # never seen or modified by the caller, so the version checks buy nothing (with the
        # copies .contiguous() made, they cost under a point of a small MLP's CPU step).
        ctx.grad = grad
        return torch.tensor(loss, dtype=logits.dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        # Grad mode is on here only under create_graph=True, i.e. when a second derivative is
        # coming, which a stored gradient cannot give: refuse it rather than return zero.
        # (torch's once_differentiable does the same check, but its wrapper cost 1-2% of a
        # small MLP's CPU step.)
        if torch.is_grad_enabled():
            raise RuntimeError(
                "the CPU difficulty-aware loss is differentiable once (no double backward); "
                "for create_graph=True use DifficultyAwareLoss.per_sample(...).mean()"
            )
        return ctx.grad * grad_output, None, None, None, None


def _kernel_error(
    status: int, row: int, logits: Tensor, targets: Tensor, table: Tensor, indices: Tensor
) -> Exception:
    if status == LENGTHS:
        return ValueError(
            f"batch sizes differ: {len(logits)} rows of logits, {len(targets)} targets, "
            f"{len(indices)} sample indices"
        )
    if status == BAD_TARGET:
        return IndexError(
            f"Target {int(targets[row])} is out of bounds for {logits.shape[1]} classes"
        )
    return IndexError(
        f"sample index {int(indices[row])} is out of range for a weight table of "
        f"{len(table)} samples"
    )


def difficulty_aware_loss_cpu(
    logits: Tensor, targets: Tensor, table: Tensor, indices: Tensor, alpha: float
) -> Tensor | None:
    """Batch mean of ``CE(logits, targets) - alpha * table[indices] * H(softmax(logits))``,
    differentiable once in ``logits``; ``None`` where the kernel does not take these tensors
    (not on the CPU, another dtype or shape), for the caller to use torch ops instead.

    The conditions guard the kernel's memory reads (it loops over ``logits``' rows and
    trusts the other arrays' type; lengths it checks itself). They are inline and use the
    cheapest tensor attributes because they run on every step: as a separate function they
    cost ~1% of a small MLP's CPU step, and ``.device.type`` costs five times ``.is_cpu``.
    """
    if (
        logits.is_cpu
        and table.is_cpu
        and indices.is_cpu
        and logits.dtype in KERNEL_DTYPES
        and table.dtype in KERNEL_DTYPES
        and targets.dtype is torch.int64
        and indices.dtype is torch.int64
        and logits.dim() == 2
        and targets.dim() == 1
        and indices.dim() == 1
    ):
        return _DifficultyAwareCPU.apply(logits, targets, table, indices, alpha)
    return None
