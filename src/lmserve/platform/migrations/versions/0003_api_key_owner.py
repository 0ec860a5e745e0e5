"""api_keys.owner: the server instance a generated key belongs to

Revision ID: 0003
Revises: 0002_usage_trace_unique
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002_usage_trace_unique"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # batch: SQLite cannot ALTER a table's columns in place; Alembic copies it there.
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("owner", sa.String(300), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("owner")
