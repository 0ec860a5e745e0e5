"""files, batches and batch_lines (the batch API); usage.batch_id marks a batch line's ledger row

Revision ID: 0004_batches
Revises: 0003
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0004_batches"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "files",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("account_id", sa.Integer, sa.ForeignKey("accounts.id"), nullable=False, index=True),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("filename", sa.String(300), nullable=False),
        sa.Column("bytes", sa.BigInteger, nullable=False),
        sa.Column("lines", sa.Integer, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "batches",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("account_id", sa.Integer, sa.ForeignKey("accounts.id"), nullable=False, index=True),
        sa.Column("key_id", sa.Integer, nullable=False),
        sa.Column("endpoint", sa.String(64), nullable=False),
        sa.Column("input_file_id", sa.String(64), nullable=False),
        sa.Column("completion_window", sa.String(16), nullable=False),
        sa.Column("status", sa.String(20), nullable=False, index=True),
        sa.Column("model", sa.String(300), nullable=True),
        sa.Column("metadata", sa.JSON, nullable=True),
        sa.Column("errors", sa.JSON, nullable=True),
        sa.Column("output_file_id", sa.String(64), nullable=True),
        sa.Column("error_file_id", sa.String(64), nullable=True),
        sa.Column("total", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", sa.Float, nullable=False, index=True),
        sa.Column("in_progress_at", sa.Float, nullable=True),
        sa.Column("expires_at", sa.Float, nullable=True),
        sa.Column("finalizing_at", sa.Float, nullable=True),
        sa.Column("completed_at", sa.Float, nullable=True),
        sa.Column("failed_at", sa.Float, nullable=True),
        sa.Column("expired_at", sa.Float, nullable=True),
        sa.Column("cancelling_at", sa.Float, nullable=True),
        sa.Column("cancelled_at", sa.Float, nullable=True),
    )
    op.create_table(
        "batch_lines",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("batch_id", sa.String(64), sa.ForeignKey("batches.id"), nullable=False),
        sa.Column("line_no", sa.Integer, nullable=False),
        sa.Column("custom_id", sa.Text, nullable=True),
        sa.Column("body", sa.Text, nullable=True),
        sa.Column("state", sa.String(12), nullable=False),
        sa.Column("claimed_by", sa.String(64), nullable=True),
        sa.Column("claimed_until", sa.Float, nullable=True),
        sa.Column("result", sa.Text, nullable=True),
        sa.UniqueConstraint("batch_id", "line_no", name="uq_batch_lines_batch_line"),
    )
    op.create_index("ix_batch_lines_state_batch", "batch_lines", ["state", "batch_id"])
    with op.batch_alter_table("usage") as batch:
        batch.add_column(sa.Column("batch_id", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("usage") as batch:
        batch.drop_column("batch_id")
    op.drop_index("ix_batch_lines_state_batch", table_name="batch_lines")
    op.drop_table("batch_lines")
    op.drop_table("batches")
    op.drop_table("files")
