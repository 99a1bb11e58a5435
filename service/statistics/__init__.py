"""The math: sufficient statistics, Gaussian fits, shrinkage, scores, weights. Pure; no I/O."""

from service.statistics.folds import N_FOLDS, assign_folds
from service.statistics.gaussian import (
    AUTO_MODES,
    FitError,
    GaussianModel,
    Shrinkage,
    fit_gaussians,
    normalize_features,
)
from service.statistics.shrinkage import (
    SHRINKAGE_GRID,
    CrossValidation,
    cross_validate_shrinkage,
    shrink,
)
from service.statistics.sufficient import SufficientStatistics
from service.statistics.weights import difficulty_weights

__all__ = [
    "AUTO_MODES",
    "N_FOLDS",
    "SHRINKAGE_GRID",
    "CrossValidation",
    "FitError",
    "GaussianModel",
    "Shrinkage",
    "SufficientStatistics",
    "assign_folds",
    "cross_validate_shrinkage",
    "difficulty_weights",
    "fit_gaussians",
    "normalize_features",
    "shrink",
]
