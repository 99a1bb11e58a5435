"""At most one queued or running job per dataset, enforced by a partial unique index.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

ACTIVE = sa.text("state IN ('queued', 'running')")


def upgrade() -> None:
    op.create_index(
        "ux_jobs_one_active_per_dataset",
        "jobs",
        ["dataset_id"],
        unique=True,
        sqlite_where=ACTIVE,
        postgresql_where=ACTIVE,
    )


def downgrade() -> None:
    op.drop_index("ux_jobs_one_active_per_dataset", table_name="jobs")
