"""The wire schemas: the public JSON contract of the REST API (docs/api.md, openapi.json). A leaf
module: the use cases build these, the routers serialise them."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from service.domain import JobState, KnnSearch, UploadKind, literal_values
from service.statistics.gaussian import parse_shrinkage

# Literal lists (not enum classes) keep the OpenAPI document as it was: inline string enums.
JobStateName = Literal[literal_values(JobState)]  # type: ignore[valid-type]
UploadKindName = Literal[literal_values(UploadKind)]  # type: ignore[valid-type]
KnnSearchName = Literal[literal_values(KnnSearch)]  # type: ignore[valid-type]
# Page cursors are unpadded URL-safe base64 (storage.scores, storage.scorings). Declaring it keeps
# a schema-valid request line short: the HTTP server refuses request heads over
# DIFFICULTY_HTTP_MAX_HEADER_BYTES, and 4,096 arbitrary characters percent-encode to 48 KiB.
CURSOR_PATTERN = r"^[A-Za-z0-9_-]*$"


class DatasetCreate(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    encoder: str | None = Field(
        default=None,
        max_length=1000,
        description="open_clip:<model>:<tag or checkpoint>, efficientnet-lite0, or a name for "
        "precomputed embeddings (default open_clip:ViT-B-16:openai)",
    )


class FitOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    normalize: bool = True
    shrinkage: Literal["auto", "auto-shared"] | float = Field(
        default="auto",
        description="'auto' (each covariance's rho by 5-fold held-out likelihood), 'auto-shared' "
        "(the tied covariance's rho for both) or a number in [0, 1]",
    )

    @field_validator("shrinkage", mode="before")
    @classmethod
    def _shrinkage(cls, value: object) -> object:
        return parse_shrinkage(value)


class ClassCount(BaseModel):
    label: str
    count: int


class FitOut(BaseModel):
    id: str
    created_at: datetime
    normalize: bool
    shrinkage: float
    shrinkage_agnostic: float
    shrinkage_requested: Any = None
    encoder: str
    weights_sha256: str | None
    num_scored: int
    dim: int
    knn_k: int | None
    # "exact" or "approximate" (an inverted-file index above DIFFICULTY_KNN_MAX_ITEMS samples);
    # null for fits made before it was recorded.
    knn_search: KnnSearchName | None = None


class DatasetOut(BaseModel):
    id: str
    name: str
    encoder: str
    created_at: datetime
    num_items: int
    num_embedded: int
    num_failed: int
    classes: list[ClassCount]
    fit: FitOut | None
    active_job_id: str | None


class DatasetList(BaseModel):
    items: list[DatasetOut]


class Created(BaseModel):
    id: str
    name: str
    encoder: str


class UploadOut(BaseModel):
    dataset_id: str
    upload_id: int
    kind: UploadKindName
    num_items: int
    classes: list[ClassCount]
    encoder: str


class JobAccepted(BaseModel):
    job_id: str
    state: str


class Progress(BaseModel):
    done: int = 0
    total: int | None = None
    per_second: float | None = None
    eta_seconds: float | None = None


class JobOut(BaseModel):
    id: str
    dataset_id: str
    kind: str
    state: JobStateName
    stage: str | None
    progress: Progress
    error: str | None
    result: dict[str, Any] | None
    attempts: int
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


class ScoreItem(BaseModel):
    sample_id: str
    label: str
    rmd: float
    md_class: float
    md_agnostic: float
    rmd_min: float
    predicted_label: str
    knn_agreement: float | None = None
    label_issue_probability: float | None = Field(
        default=None, description="calibrated probability that the given label is wrong (docs/method.md)"
    )
    suggested_label: str | None = Field(default=None, description="the most likely true label")
    suggested_label_probability: float | None = None
    is_label_issue: bool | None = Field(default=None, description="label_issue_probability >= the threshold")


class ScorePage(BaseModel):
    items: list[ScoreItem]
    next_cursor: str | None
    fit_id: str


class NewItemScore(BaseModel):
    sample_id: str
    label: str | None = None
    rmd: float | None = None
    md_class: float | None = None
    md_agnostic: float
    rmd_min: float
    predicted_label: str


class NewScores(BaseModel):
    fit_id: str
    items: list[NewItemScore]
    failures: list[dict[str, str]] = []


class ClassSummary(BaseModel):
    label: str
    count: int
    rmd_mean: float
    rmd_p10: float
    rmd_p50: float
    rmd_p90: float
    rmd_p99: float
    predicted_differs: float = Field(description="share of the class whose predicted_label differs from its label")
    label_issues: int | None = Field(default=None, description="samples of the class flagged is_label_issue")


class Summary(BaseModel):
    fit_id: str
    classes: list[ClassSummary]


class Neighbor(BaseModel):
    sample_id: str
    label: str | None
    similarity: float


class Neighbors(BaseModel):
    fit_id: str
    sample_id: str
    label: str | None
    neighbors: list[Neighbor]


class Failure(BaseModel):
    sample_id: str
    reason: str


class Failures(BaseModel):
    count: int
    items: list[Failure]


class ScoringResult(BaseModel):
    """One page of an archive-scoring job's result (``GET /v1/jobs/{job_id}/result``), in archive
    order; the first page also lists the members that could not be embedded."""

    job_id: str
    fit_id: str
    num_scored: int
    num_failed: int
    items: list[NewItemScore]
    next_cursor: str | None = None
    failures: list[Failure] = Field(default=[], description="first page only, at most 1000 (num_failed counts all)")


class Health(BaseModel):
    status: str
    checks: dict[str, str] = {}


# -- the dashboard's routes: one sample's evidence, the map's rows ------------------------------


class ClassDistance(BaseModel):
    label: str
    rmd: float = Field(description="relative Mahalanobis distance to this class (md_class - md_agnostic)")
    md_class: float


class SampleNeighbor(BaseModel):
    sample_id: str
    label: str | None
    similarity: float = Field(description="cosine similarity to the sample")
    scores: dict[str, bool | float | str | None] | None = Field(
        description="the neighbor's row of the score table (None where it was not scored: unlabelled)"
    )


class SampleDetail(BaseModel):
    fit_id: str
    sample_id: str
    label: str | None
    predicted_label: str
    scores: dict[str, bool | float | str | None] | None = Field(
        description="every column of the sample's row in the current fit's score table"
    )
    class_distances: list[ClassDistance] = Field(description="rmd to every fitted class, nearest first")
    neighbors: list[SampleNeighbor]
    has_thumbnail: bool


class MapRows(BaseModel):
    fit_id: str
    rows: list[int]
    items: list[ScoreItem]


class LabelIssue(BaseModel):
    sample_id: str
    label: str
    suggested_label: str
    suggested_label_probability: float
    label_issue_probability: float
    is_label_issue: bool
    rmd: float
    disagreeing_neighbors: list[str] = Field(
        description="IDs of the sample's nearest neighbors whose label differs from its own (the evidence)"
    )


class LabelIssuePage(BaseModel):
    items: list[LabelIssue]
    next_cursor: str | None
    fit_id: str
    threshold: float = Field(description="is_label_issue is label_issue_probability >= threshold")
