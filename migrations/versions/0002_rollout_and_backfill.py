"""Operations: model activation history (rollback), backfill jobs (resumable cursors), album views that
survive a rollback.

* ``model_activations``: one row each time a version becomes active, written by a trigger on
  ``model_versions`` so that every path (``landmarks publish``, ``promote``, ``rollback``, plain SQL)
  is recorded; ``landmarks rollback`` replays it.
* ``backfill_jobs``: the keyset cursor of each ``landmarks backfill``, so an interrupted backfill resumes.
* ``album_photos`` keeps every photo that is not deleted instead of only those whose *latest* processing
  tagged them: ``photos.status`` is the latest version's verdict, so after a rollback it would hide the
  restored version's tags. Under one version nothing changes: a version's tags exist only for photos
  whose latest processing by that version tagged them (the writer replaces them), and deletion drops
  all tags.

Revision ID: 0002
Revises: 0001
Create Date: 2025-02-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

TIMESTAMPTZ = sa.DateTime(timezone=True)

ALBUM_PHOTOS_0001 = """
SELECT t.user_id, t.landmark_id, t.photo_id, p.uri, p.uploaded_at, t.score, t.method, t.rank
FROM photo_tags t
JOIN model_versions mv ON mv.version = t.model_version AND mv.is_active
JOIN photos p ON p.user_id = t.user_id AND p.photo_id = t.photo_id
WHERE p.status = 'tagged'
"""
ALBUM_PHOTOS_0002 = """
SELECT t.user_id, t.landmark_id, t.photo_id, p.uri, p.uploaded_at, t.score, t.method, t.rank
FROM photo_tags t
JOIN model_versions mv ON mv.version = t.model_version AND mv.is_active
JOIN photos p ON p.user_id = t.user_id AND p.photo_id = t.photo_id
WHERE p.status <> 'deleted'
"""

# `landmarks promote|rollback` name the action and actor with set_config(..., true) in their transaction.
TRIGGER_FUNCTION = """
CREATE FUNCTION landmarks_record_activation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.is_active AND (TG_OP = 'INSERT' OR NOT OLD.is_active) THEN
        INSERT INTO model_activations (version, previous_version, action, actor)
        VALUES (
            NEW.version,
            (SELECT a.version FROM model_activations a ORDER BY a.id DESC LIMIT 1),
            COALESCE(NULLIF(current_setting('landmarks.activation_action', true), ''), 'activate'),
            COALESCE(NULLIF(current_setting('landmarks.activation_actor', true), ''), session_user)
        );
    END IF;
    RETURN NULL;
END
$$
"""


def upgrade() -> None:
    op.create_table(
        "model_activations",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False, comment="Order of activation"),
        sa.Column("version", sa.Text(), nullable=False, comment="The version that became active"),
        sa.Column("previous_version", sa.Text(), nullable=True, comment="The version recorded as active before it"),
        sa.Column("action", sa.Text(), nullable=False, comment="activate (publish, SQL) | promote | rollback | initial"),
        sa.Column("actor", sa.Text(), nullable=False, comment="Who: the CLI's user@host, else the database user"),
        sa.Column("activated_at", TIMESTAMPTZ, server_default=sa.func.now(), nullable=False, comment="When"),
        sa.ForeignKeyConstraint(["version"], ["model_versions.version"], ondelete="CASCADE",
                                name="fk_model_activations_version_model_versions"),
        sa.PrimaryKeyConstraint("id", name="pk_model_activations"),
        comment="History of the active model version (written by a trigger); `landmarks rollback` replays it.",
    )
    op.create_table(
        "backfill_jobs",
        sa.Column("name", sa.Text(), nullable=False, comment="Job name: the same command resumes the same job"),
        sa.Column("scope", postgresql.JSONB(), nullable=False, comment="Which photos: {user} | {since} | {all}"),
        sa.Column("model_version", sa.Text(), nullable=True, comment="Active version when the job started"),
        sa.Column("cursor_user_id", sa.Text(), nullable=True, comment="Keyset cursor: last enqueued photo's user"),
        sa.Column("cursor_photo_id", sa.Text(), nullable=True, comment="Keyset cursor: last enqueued photo"),
        sa.Column("enqueued", sa.BigInteger(), server_default=sa.text("0"), nullable=False, comment="Events sent so far"),
        sa.Column("total", sa.BigInteger(), nullable=True, comment="Photos in scope when the job started"),
        sa.Column("rate", sa.REAL(), nullable=True, comment="Events per second asked for by the last run"),
        sa.Column("status", sa.Text(), nullable=False, comment="running | done"),
        sa.Column("created_at", TIMESTAMPTZ, server_default=sa.func.now(), nullable=False, comment="When it started"),
        sa.Column("updated_at", TIMESTAMPTZ, server_default=sa.func.now(), nullable=False, comment="Last progress"),
        sa.Column("finished_at", TIMESTAMPTZ, nullable=True, comment="When it enqueued its last photo"),
        sa.CheckConstraint("status IN ('running', 'done')", name="ck_backfill_jobs_status"),
        sa.PrimaryKeyConstraint("name", name="pk_backfill_jobs"),
        comment="Resumable backfills: `landmarks backfill` re-enqueues stored photos for the active version.",
    )
    op.execute(TRIGGER_FUNCTION)
    op.execute("CREATE TRIGGER model_versions_record_activation AFTER INSERT OR UPDATE OF is_active "
               "ON model_versions FOR EACH ROW EXECUTE FUNCTION landmarks_record_activation()")
    # The history starts with whatever is active now.
    op.execute("INSERT INTO model_activations (version, action, actor) "
               "SELECT version, 'initial', session_user FROM model_versions WHERE is_active")
    op.execute(f"CREATE OR REPLACE VIEW album_photos AS {ALBUM_PHOTOS_0002.strip()}")


def downgrade() -> None:
    op.execute(f"CREATE OR REPLACE VIEW album_photos AS {ALBUM_PHOTOS_0001.strip()}")
    op.execute("DROP TRIGGER IF EXISTS model_versions_record_activation ON model_versions")
    op.execute("DROP FUNCTION IF EXISTS landmarks_record_activation()")
    op.drop_table("backfill_jobs")
    op.drop_table("model_activations")
