"""The database: SQLAlchemy 2 models, engine set-up and Alembic migrations.

SQLite (a file in the data dir) is the embedded default; PostgreSQL is chosen by URL. Arrays
never live here (they are files under the data dir); the database holds the catalogue (datasets,
uploads, fits) and the job queue.
"""

from __future__ import annotations

import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    create_engine,
    event,
    text,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from service.domain import JobKind, JobState, UploadState

if TYPE_CHECKING:
    from service.settings import Settings

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def new_id() -> str:
    return uuid.uuid4().hex


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    pass


class Dataset(Base):
    __tablename__ = "datasets"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(200), index=True)
    name: Mapped[str] = mapped_column(String(200))
    encoder: Mapped[str] = mapped_column(String(1000))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    current_fit_id: Mapped[str | None] = mapped_column(String(32), nullable=True)


class Upload(Base):
    """One accepted upload (an archive or an embeddings matrix), waiting for or done embedding."""

    __tablename__ = "uploads"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    dataset_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("datasets.id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[str] = mapped_column(String(20))  # UploadKind
    path: Mapped[str] = mapped_column(String(1000))  # relative to the dataset's folder
    num_items: Mapped[int] = mapped_column(Integer)
    classes: Mapped[dict[str, int]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(20), default=UploadState.PENDING)
    # Set when embedding starts: rows [k*chunk_rows, ...) go to store chunk first_chunk+k, so a
    # resumed job knows which rows are done from the chunks present.
    first_chunk: Mapped[int | None] = mapped_column(Integer, nullable=True)
    chunk_rows: Mapped[int | None] = mapped_column(Integer, nullable=True)
    num_embedded: Mapped[int] = mapped_column(Integer, default=0)
    num_failed: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Fit(Base):
    __tablename__ = "fits"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    dataset_id: Mapped[str] = mapped_column(
        String(32), ForeignKey("datasets.id", ondelete="CASCADE"), index=True
    )
    job_id: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    normalize: Mapped[bool] = mapped_column(Boolean)
    shrinkage_requested: Mapped[Any] = mapped_column(JSON, nullable=True)  # "auto" or a number
    shrinkage: Mapped[float] = mapped_column(Float)
    shrinkage_agnostic: Mapped[float] = mapped_column(Float)
    encoder: Mapped[str] = mapped_column(String(1000))
    weights_sha256: Mapped[str | None] = mapped_column(String(64), nullable=True)
    num_scored: Mapped[int] = mapped_column(Integer)
    dim: Mapped[int] = mapped_column(Integer)
    knn_k: Mapped[int | None] = mapped_column(Integer, nullable=True)
    knn_search: Mapped[str | None] = mapped_column(String(16), nullable=True)  # domain.KnnSearch
    summary: Mapped[list[dict[str, Any]]] = mapped_column(JSON)


ACTIVE_JOB_STATES = "state IN ('queued', 'running')"


class Job(Base):
    __tablename__ = "jobs"
    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    dataset_id: Mapped[str] = mapped_column(String(32), index=True)
    tenant: Mapped[str] = mapped_column(String(200), index=True)
    kind: Mapped[str] = mapped_column(String(20), default=JobKind.FIT)
    state: Mapped[str] = mapped_column(String(20), default=JobState.QUEUED)
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    stage: Mapped[str | None] = mapped_column(String(40), nullable=True)
    progress: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # Leases are epoch seconds from the worker's clock: comparisons stay plain floats on both
    # SQLite and PostgreSQL.
    lease_owner: Mapped[str | None] = mapped_column(String(100), nullable=True)
    lease_expires_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    heartbeat_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    __table_args__ = (
        Index("ix_jobs_state_created", "state", "created_at"),
        # One active job per dataset, enforced by the database: two concurrent POST /fit
        # requests cannot both insert (a second fit would race on the dataset's files).
        Index(
            "ux_jobs_one_active_per_dataset",
            "dataset_id",
            unique=True,
            sqlite_where=text(ACTIVE_JOB_STATES),
            postgresql_where=text(ACTIVE_JOB_STATES),
        ),
    )


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
            # WAL lets the API read while a worker writes; foreign keys make deletes cascade.
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


def make_sessionmaker(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)


def migrate(engine: Engine) -> None:
    """Bring the schema to the latest revision (idempotent; safe for concurrent starters)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    for attempt in range(5):
        try:
            with engine.begin() as connection:
                if connection.dialect.name == "postgresql":
                    # Server and workers may start together: one migrates, the others wait.
                    connection.exec_driver_sql("SELECT pg_advisory_xact_lock(732150001)")
                config.attributes["connection"] = connection
                command.upgrade(config, "head")
            return
        except Exception:
            if attempt == 4:
                raise
            time.sleep(0.5 * (attempt + 1))


def engine_of(db: sessionmaker) -> Engine:
    """The engine behind a session factory of :func:`open_database`: for a Core connection on a
    hot path, its URL in a log line, or disposing of it at shutdown."""
    return db.kw["bind"]


def open_database(settings: Settings) -> sessionmaker:
    """The database the settings name, migrated to the latest revision: how the API and every
    worker open it (its engine: :func:`engine_of`; dispose it at shutdown)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.database_url)
    migrate(engine)
    return make_sessionmaker(engine)
