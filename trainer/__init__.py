"""Difficulty-aware training: pull per-sample difficulty scores from the service by dataset ID
and train classifiers with difficulty-aware entropy regularisation (Cui et al., NeurIPS 2023).

Talks to the service over HTTP only; never imports ``service``.
"""

from trainer.client import (
    AuthenticationError,
    DatasetNotFittedError,
    DatasetNotFoundError,
    DifficultyClient,
    DifficultyClientError,
    FetchedScores,
    ServiceUnavailableError,
)
from trainer.data import ScoredDataset, ScoreTable, image_folder_labels, image_folder_sample_ids
from trainer.losses import (
    ConfidencePenaltyLoss,
    CrossEntropyLoss,
    DifficultyAwareLoss,
    FocalLoss,
    LabelSmoothingLoss,
    build_loss,
    difficulty_weights,
)

__all__ = [
    "AuthenticationError",
    "ConfidencePenaltyLoss",
    "CrossEntropyLoss",
    "DatasetNotFittedError",
    "DatasetNotFoundError",
    "DifficultyAwareLoss",
    "DifficultyClient",
    "DifficultyClientError",
    "FetchedScores",
    "FocalLoss",
    "LabelSmoothingLoss",
    "ScoreTable",
    "ScoredDataset",
    "ServiceUnavailableError",
    "build_loss",
    "difficulty_weights",
    "image_folder_labels",
    "image_folder_sample_ids",
]
