"""Shadow rollouts: a candidate version tags a sampled share of live uploads beside the active one.

* ``shadow_rollouts``: one row per shadow run (`landmarks publish MODEL --shadow --share S`); the running
  one has no ``stopped_at`` (at most one, by a partial unique index). Workers read it every few seconds.
* ``shadow_photos``: the photos a shadow version has processed, tagged or not. Its tags go to
  ``photo_tags`` under its own version (the album views show only the active version's), but a photo it
  found no landmark on leaves no tag, and ``landmarks compare`` must count that verdict as seen.

Revision ID: 0004
Revises: 0003
Create Date: 2025-03-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

TIMESTAMPTZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "shadow_rollouts",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False, comment="Order of start"),
        sa.Column("version", sa.Text(), nullable=False, comment="The candidate version"),
        sa.Column("share", sa.Double(), nullable=False, comment="Share of photos sampled, in (0, 1]"),
        sa.Column("actor", sa.Text(), nullable=False, comment="Who started it: the CLI's user@host"),
        sa.Column("started_at", TIMESTAMPTZ, server_default=sa.func.now(), nullable=False, comment="When it started"),
        sa.Column("stopped_at", TIMESTAMPTZ, nullable=True, comment="When it stopped; NULL while it runs"),
        sa.Column("stop_reason", sa.Text(), nullable=True,
                  comment="stopped | promoted | replaced (another shadow started)"),
        sa.CheckConstraint("share > 0 AND share <= 1", name="ck_shadow_rollouts_share_range"),
        sa.CheckConstraint("stop_reason IN ('stopped', 'promoted', 'replaced')", name="ck_shadow_rollouts_stop_reason"),
        sa.ForeignKeyConstraint(["version"], ["model_versions.version"], ondelete="CASCADE",
                                name="fk_shadow_rollouts_version_model_versions"),
        sa.PrimaryKeyConstraint("id", name="pk_shadow_rollouts"),
        comment="Shadow runs: a candidate version tags a sampled share of live uploads beside the active one; "
                "the running one has no stopped_at.",
    )
    op.create_index("uq_shadow_rollouts_one_running", "shadow_rollouts", [sa.text("(stopped_at IS NULL)")],
                    unique=True, postgresql_where=sa.text("stopped_at IS NULL"))
    op.create_table(
        "shadow_photos",
        sa.Column("user_id", sa.Text(), nullable=False, comment="Owner"),
        sa.Column("photo_id", sa.Text(), nullable=False, comment="Photo id"),
        sa.Column("model_version", sa.Text(), nullable=False, comment="The shadow version"),
        sa.Column("processed_at", TIMESTAMPTZ, server_default=sa.func.now(), nullable=False,
                  comment="When the shadow last processed the photo"),
        sa.ForeignKeyConstraint(["user_id", "photo_id"], ["photos.user_id", "photos.photo_id"], ondelete="CASCADE",
                                name="fk_shadow_photos_photo"),
        sa.ForeignKeyConstraint(["model_version"], ["model_versions.version"], ondelete="CASCADE",
                                name="fk_shadow_photos_model_version_model_versions"),
        sa.PrimaryKeyConstraint("user_id", "photo_id", "model_version", name="pk_shadow_photos"),
        comment="Photos a shadow version has processed, tagged or not, so that `landmarks compare` counts its "
                "'no landmark' verdicts as seen.",
    )
    op.create_index("ix_shadow_photos_version", "shadow_photos", ["model_version"])


def downgrade() -> None:
    op.drop_index("ix_shadow_photos_version", table_name="shadow_photos")
    op.drop_table("shadow_photos")
    op.drop_index("uq_shadow_rollouts_one_running", table_name="shadow_rollouts")
    op.drop_table("shadow_rollouts")
