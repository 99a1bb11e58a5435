"""Per-sample training weights ``w_i = g(s_i)`` in [0, 1] from difficulty scores.

Every mapping here is a pure function of the whole training set's scores (computed once, never
per batch), bounded in [0, 1] and non-decreasing in the score. They differ in how they treat the
scale of the scores, which is what matters on real data: RMD from EfficientNet-Lite0 features of
Fashion-MNIST is heavy-tailed (median -4, 99th percentile 49, max 3,848).

- ``"quantile"`` (the default): min-max between two quantiles of the scores,
  ``clip((s - q_low) / (q_high - q_low), 0, 1)`` with q_low, q_high the 5th and 95th
  percentiles: the easiest 5% get 0, the hardest 5% get 1, linear in the score between. The caps
  make it insensitive to outliers beyond them; it keeps the scores' spacing between them.
- ``"rank"``: ``w_i = exp((r_i / N - 1) / T)`` with ``r_i`` the rank of ``s_i`` (1 = easiest,
  ties share their average rank). Depends on the order of the scores only, so an outlier or any
  monotone rescaling changes nothing; the hardest sample gets 1, the easiest ``exp(-1/T)``; mean
  weight ``T * (1 - exp(-1/T))`` (0.29 at T = 0.3) whatever the scores.
- ``"robust-sigmoid"``: ``sigmoid((s - median) / (T * 1.4826 * MAD))``, a z-score on a robust
  scale: half of the samples above 0.5.
- ``"exp-max"``: the original convention, ``exp((s - max_j s_j) / T)`` with ``T = std(s)``.
  Kept by name for the record: it is degenerate on heavy-tailed scores (anchored at the single
  hardest sample, so one far outlier makes every other weight ~0 and the loss plain CE).

The default was chosen on validation data with noisy labels (docs/trainer.md, "Which mapping"):
over seven label-noise and small-data regimes, ``quantile`` had the lowest mean validation-NLL
regret; ``rank`` at T = 0.3 was second (and the choice on clean validation labels).

:func:`map_scores` returns the weights with the resolved parameters and the mean weight, which is
what a comparison with constant entropy regularisation must match (``beta = alpha * mean(w)``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import numpy as np
from scipy.stats import rankdata

MappingName = Literal["quantile", "rank", "robust-sigmoid", "exp-max"]
MAPPING_NAMES: tuple[str, ...] = get_args(MappingName)
DEFAULT_MAPPING: MappingName = "quantile"
Temperature = float | Literal["auto"]

# The rank mapping's default temperature: of the two tried (0.3, 1), the one with the lower
# validation-NLL regret in the label-noise and small-data benchmark (docs/trainer.md).
RANK_T = 0.3
SIGMOID_T = 1.0
QUANTILE_LOW, QUANTILE_HIGH = 0.05, 0.95
MAD_TO_SIGMA = 1.4826  # MAD * this = std for a normal distribution


@dataclass(frozen=True)
class WeightMapping:
    """The weights of one training set and how they were made."""

    weights: np.ndarray  # float64, one per score, in [0, 1]
    mapping: str
    params: dict[str, float]  # resolved ("auto" replaced by the number used)

    @property
    def mean_weight(self) -> float:
        return float(self.weights.mean())

    def describe(self) -> dict[str, Any]:
        """For reports: mapping, resolved parameters, mean weight and share of weights > 0.1."""
        return {
            "mapping": self.mapping,
            "mapping_params": dict(self.params),
            "mean_weight": self.mean_weight,
            "share_weight_above_0.1": float((self.weights > 0.1).mean()),
        }


def _check_scores(scores: Sequence[float] | np.ndarray) -> np.ndarray:
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 1 or s.size == 0:
        raise ValueError("scores must be a non-empty 1-d array")
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf")
    return s


def _positive(value: Any, name: str) -> float:
    t = float(value)
    if not np.isfinite(t) or t <= 0:
        raise ValueError(f"{name} must be a positive number or 'auto', got {value!r}")
    return t


def _exp_max(s: np.ndarray, temperature: Temperature = "auto") -> tuple[np.ndarray, dict]:
    if temperature == "auto":
        t = float(s.std())
        # All scores equal: every sample is as hard as the hardest, weight 1 (any T gives that).
        t = t if t > 0 else 1.0
    else:
        t = _positive(temperature, "temperature")
    return np.exp((s - s.max()) / t), {"temperature": t}


def _rank(s: np.ndarray, temperature: Temperature = "auto") -> tuple[np.ndarray, dict]:
    t = RANK_T if temperature == "auto" else _positive(temperature, "temperature")
    u = rankdata(s, method="average") / s.size  # in (0, 1]; the hardest sample has 1
    return np.exp((u - 1.0) / t), {"temperature": t}


def _quantile(
    s: np.ndarray, low: float | None = None, high: float | None = None
) -> tuple[np.ndarray, dict]:
    q_low = QUANTILE_LOW if low is None else float(low)
    q_high = QUANTILE_HIGH if high is None else float(high)
    if not 0.0 <= q_low < q_high <= 1.0:
        raise ValueError(f"need 0 <= low < high <= 1, got low={q_low}, high={q_high}")
    lo, hi = (float(v) for v in np.quantile(s, [q_low, q_high]))
    # Coinciding quantiles (many tied scores): a step, the tied value itself at 0.5.
    step = 0.5 * (s >= hi) + 0.5 * (s > hi)
    w = np.clip((s - lo) / (hi - lo), 0.0, 1.0) if hi > lo else step
    return w, {"low": q_low, "high": q_high, "score_low": lo, "score_high": hi}


def _robust_sigmoid(s: np.ndarray, temperature: Temperature = "auto") -> tuple[np.ndarray, dict]:
    t = SIGMOID_T if temperature == "auto" else _positive(temperature, "temperature")
    median = float(np.median(s))
    scale = MAD_TO_SIGMA * float(np.median(np.abs(s - median)))
    if scale <= 0:  # more than half the scores tied: fall back to the std, then to 1
        scale = float(s.std()) or 1.0
    z = (s - median) / (t * scale)
    # 0.5 * (1 + tanh(z / 2)) is the logistic function without overflow in exp(-z).
    return 0.5 * (1.0 + np.tanh(z / 2.0)), {"temperature": t, "median": median, "scale": scale}


MAPPINGS: dict[str, Callable[..., tuple[np.ndarray, dict]]] = {
    "quantile": _quantile,
    "rank": _rank,
    "robust-sigmoid": _robust_sigmoid,
    "exp-max": _exp_max,
}
# Which keyword parameters each mapping takes (the command line passes only these).
MAPPING_PARAMS: dict[str, tuple[str, ...]] = {
    "rank": ("temperature",),
    "quantile": ("low", "high"),
    "robust-sigmoid": ("temperature",),
    "exp-max": ("temperature",),
}


def map_scores(
    scores: Sequence[float] | np.ndarray, mapping: str = DEFAULT_MAPPING, **params: Any
) -> WeightMapping:
    """Weights for every training sample from all their scores, by mapping name.

    ``params`` are the mapping's own (``low``/``high`` quantiles for quantile; ``temperature``
    for rank, robust-sigmoid and exp-max); ``None`` or ``"auto"`` means its default. A
    parameter the mapping does not take raises, so a misspelt setting cannot pass silently.
    """
    if mapping not in MAPPINGS:
        raise ValueError(f"unknown weight mapping {mapping!r}; choose one of {', '.join(MAPPINGS)}")
    s = _check_scores(scores)
    given = {k: v for k, v in params.items() if v is not None}
    unknown = set(given) - set(MAPPING_PARAMS[mapping])
    unused = {k for k in unknown if given[k] == "auto"}  # "auto" everywhere is harmless
    if unknown - unused:
        raise ValueError(
            f"mapping {mapping!r} takes {', '.join(MAPPING_PARAMS[mapping])}, "
            f"not {', '.join(sorted(unknown - unused))}"
        )
    weights, resolved = MAPPINGS[mapping](s, **{k: v for k, v in given.items() if k not in unused})
    return WeightMapping(weights=weights, mapping=mapping, params=resolved)


def difficulty_weights(
    scores: Sequence[float] | np.ndarray, mapping: str = DEFAULT_MAPPING, **params: Any
) -> np.ndarray:
    """The weights alone (see :func:`map_scores`)."""
    return map_scores(scores, mapping, **params).weights
