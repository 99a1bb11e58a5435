"""A fit records how its kNN column searched: exact or approximate (inverted-file index).

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Fits before this revision searched exactly or left the column empty: null means unknown.
    op.add_column("fits", sa.Column("knn_search", sa.String(16), nullable=True))


def downgrade() -> None:
    op.drop_column("fits", "knn_search")
