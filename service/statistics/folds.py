"""Deterministic cross-validation folds from sample IDs.

The fold of a sample depends only on its ID, so statistics accumulated in any order, on any
worker, agree on which fold every sample belongs to.
"""

from collections.abc import Sequence
from zlib import crc32

import numpy as np

N_FOLDS = 5


def assign_folds(sample_ids: Sequence[str], n_folds: int = N_FOLDS) -> np.ndarray:
    """Fold index in [0, n_folds) for each sample ID (CRC-32 of its UTF-8 bytes)."""
    return np.fromiter(
        (crc32(str(s).encode("utf-8")) % n_folds for s in sample_ids),
        dtype=np.int64,
        count=len(sample_ids),
    )
