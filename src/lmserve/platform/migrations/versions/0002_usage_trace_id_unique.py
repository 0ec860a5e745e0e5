"""usage.trace_id unique: one ledger row per request, whatever is retried or replayed

Rows a retried write doubled before this constraint existed are removed first (the copy with
the higher id; both were charged, so the account is refunded the copy's cost).

Revision ID: 0002_usage_trace_unique
Revises: 0001
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_usage_trace_unique"
down_revision = "0001"
branch_labels = None
depends_on = None

_DUPLICATES = ("SELECT id FROM usage u WHERE EXISTS "
               "(SELECT 1 FROM usage o WHERE o.trace_id = u.trace_id AND o.id < u.id)")


def upgrade() -> None:
    conn = op.get_bind()
    refunds = conn.execute(sa.text(
        f"SELECT account_id, SUM(cost_nanos) FROM usage WHERE id IN ({_DUPLICATES}) GROUP BY account_id")).all()
    for account_id, cost in refunds:
        if cost:
            conn.execute(sa.text("UPDATE accounts SET charge_balance_nanos = charge_balance_nanos + :c "
                                 "WHERE id = :a AND unlimited = :f"), {"c": int(cost), "a": account_id, "f": False})
    conn.execute(sa.text(f"DELETE FROM usage WHERE id IN ({_DUPLICATES})"))
    op.drop_index("ix_usage_trace_id", table_name="usage")
    op.create_index("ix_usage_trace_id", "usage", ["trace_id"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_usage_trace_id", table_name="usage")
    op.create_index("ix_usage_trace_id", "usage", ["trace_id"])
