"""Row-parallel passes over (N, K) arrays: the label-issue model's softmaxes and EM steps.

numpy's elementwise functions (``exp``, ``log``, reductions) run on one core and, over a whole
(100,000 x 100) array, stream every temporary through main memory. Cut into blocks of rows that
fit in cache and spread over a few threads (numpy releases the GIL inside them), the same
per-row arithmetic ran 2-3x faster on 2 cores. Each row is computed exactly as it would be in one
pass; results that sum over rows are combined in block order, so the output does not depend on
the number of threads.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

# Rows per block: 2,048 x K=100 float64 is 1.6 MB, an L2/L3-sized working set per thread.
BLOCK_ROWS = 2048
# Threads at most (one per core up to this): the passes are memory-bound beyond a few cores.
MAX_THREADS = 8

T = TypeVar("T")
_pool: ThreadPoolExecutor | None = None


def _threads() -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(MAX_THREADS, cores))


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(_threads(), thread_name_prefix="rows")
    return _pool


def _forget_pool() -> None:
    # A forked child inherits the pool object but not its threads: it would wait forever.
    global _pool
    _pool = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def map_row_blocks(fn: Callable[[slice], T], n: int, block: int | None = None) -> list[T]:
    """``[fn(rows) for rows in blocks of range(n)]``, the blocks (``BLOCK_ROWS`` rows unless
    given) computed in parallel, the results in block order. ``fn`` must only read shared
    inputs and write its own rows; it must not call BLAS (OpenBLAS serialises calls from several
    threads: a one-hot GEMM per block made an EM step 20x slower)."""
    block = BLOCK_ROWS if block is None else block
    blocks = [slice(start, min(start + block, n)) for start in range(0, n, block)]
    if len(blocks) <= 1 or _threads() == 1:
        return [fn(rows) for rows in blocks]
    return list(_executor().map(fn, blocks))
