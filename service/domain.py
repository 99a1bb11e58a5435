"""The service's vocabulary, written once: states, kinds and modes as enums.

They are ``StrEnum``: each member *is* its string, so database columns, JSON and settings hold the
plain value (``"queued"``) and compare equal to the member. Migrations keep their own frozen
literals (a migration must not change when this file does).
"""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


ACTIVE_JOB_STATES: tuple[JobState, ...] = (JobState.QUEUED, JobState.RUNNING)
FINAL_JOB_STATES: tuple[JobState, ...] = (JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED)


class JobKind(StrEnum):
    FIT = "fit"
    SCORE = "score"  # an image archive scored against a fit (POST /v1/datasets/{id}/score)


class JobStage(StrEnum):
    """What a running fit job is doing; progress counts refer to the current stage."""

    EMBEDDING = "embedding"
    FITTING = "fitting"
    SCORING = "scoring"
    NEIGHBORS = "neighbors"
    LABEL_ISSUES = "label_issues"
    MAP = "map"
    PUBLISHING = "publishing"
    DONE = "done"


class UploadKind(StrEnum):
    ARCHIVE = "archive"  # images in ImageFolder layout, embedded by the fit job
    EMBEDDINGS = "embeddings"  # precomputed features


class UploadState(StrEnum):
    PENDING = "pending"  # stored, not yet in the embedding store
    EMBEDDED = "embedded"


class ExecutorKind(StrEnum):
    """Where fit jobs embed images."""

    LOCAL = "local"  # this process
    RAY = "ray"  # a Ray cluster (RAY_ADDRESS, or a private local one)


class KnnSearch(StrEnum):
    """How a fit's kNN label agreement found each sample's neighbours."""

    EXACT = "exact"  # flat index: every sample compared with every other
    APPROXIMATE = "approximate"  # inverted-file index above the exact limit (recall measured)


def literal_values(enum: type[StrEnum]) -> tuple[str, ...]:
    """The members' values, for ``Literal[...]`` wire types (same OpenAPI as a literal list)."""
    return tuple(member.value for member in enum)
