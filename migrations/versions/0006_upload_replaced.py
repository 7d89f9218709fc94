"""``photos.upload_replaced``: whether the last upload written replaced another one.

The writer drops every version's tags and shadow verdicts of a photo whose upload it replaces (a rollback
would otherwise show the old picture's landmarks on the new one). It learns that from the upsert itself:
``DO UPDATE SET`` reads the row it locked, the latest committed one. A subquery in ``RETURNING`` would read
the statement's snapshot, which misses an upload another batch committed while this one waited for the
row's lock.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A constant default: PostgreSQL adds the column without rewriting the table.
    op.add_column("photos", sa.Column(
        "upload_replaced", sa.Boolean(), server_default=sa.text("false"), nullable=False,
        comment="Whether the last upload written replaced another one (every version's tags of it were dropped)"))


def downgrade() -> None:
    op.drop_column("photos", "upload_replaced")
