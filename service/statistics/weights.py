"""Training weights from difficulty scores: ``w_i = exp((s_i - max_j s_j) / T)``."""

from typing import Literal

import numpy as np


def difficulty_weights(
    scores: np.ndarray, temperature: float | Literal["auto"] = "auto"
) -> np.ndarray:
    """Weights in (0, 1]; the hardest sample gets 1. ``"auto"``: T = std of the scores."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError("scores must be a non-empty 1-d array")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    if temperature == "auto":
        t = float(s.std())
        if t == 0.0:
            return np.ones_like(s)
    else:
        t = float(temperature)
        if not np.isfinite(t) or t <= 0:
            raise ValueError(f"temperature must be positive or 'auto', got {temperature!r}")
    return np.exp((s - s.max()) / t)
