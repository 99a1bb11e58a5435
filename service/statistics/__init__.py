"""The math: sufficient statistics, Gaussian fits, shrinkage, scores. Pure; no I/O. (Training
weights belong to the trainer, which computes them from the scores it downloads.)"""

from service.statistics.folds import N_FOLDS, assign_folds
from service.statistics.gaussian import (
    AUTO_MODES,
    FitError,
    GaussianModel,
    Shrinkage,
    fit_gaussians,
    normalize_features,
    parse_shrinkage,
)
from service.statistics.shrinkage import (
    SHRINKAGE_GRID,
    CrossValidation,
    cross_validate_shrinkage,
    shrink,
)
from service.statistics.sufficient import SufficientStatistics

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
    "fit_gaussians",
    "normalize_features",
    "parse_shrinkage",
    "shrink",
]
