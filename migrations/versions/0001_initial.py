"""Initial schema: landmarks, model versions, photos, tags, idempotency ledger, dead letters, album views.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TIMESTAMPTZ = sa.DateTime(timezone=True)

# The album service's interface. Only tags of the active model version, only photos whose latest
# processing tagged them; deleted photos have no tags, so they never appear.
VIEWS = {
    "album_photos": (
        """
        SELECT t.user_id, t.landmark_id, t.photo_id, p.uri, p.uploaded_at, t.score, t.method, t.rank
        FROM photo_tags t
        JOIN model_versions mv ON mv.version = t.model_version AND mv.is_active
        JOIN photos p ON p.user_id = t.user_id AND p.photo_id = t.photo_id
        WHERE p.status = 'tagged'
        """,
        "Album service interface: one row per (user, landmark, photo) tagged by the active model version. "
        "score = similarity of the best centroid; method = geo (GPS) or reference (no GPS); "
        "rank 0 = the photo's best landmark. Page it by (uploaded_at DESC, photo_id DESC).",
    ),
    "album_landmarks": (
        """
        SELECT a.user_id, a.landmark_id, l.name, l.city, l.country,
               count(*) AS photo_count,
               (array_agg(a.photo_id ORDER BY a.score DESC, a.uploaded_at DESC NULLS LAST, a.photo_id DESC))[1]
                   AS cover_photo_id,
               max(a.uploaded_at) AS latest_uploaded_at
        FROM album_photos a
        JOIN landmarks l ON l.id = a.landmark_id
        GROUP BY a.user_id, a.landmark_id, l.name, l.city, l.country
        """,
        "Album service interface: one album per (user, landmark) of the active model version. "
        "cover_photo_id = the photo with the highest score (ties: newest upload).",
    ),
    "album_cities": (
        """
        SELECT a.user_id, l.country, l.city,
               count(DISTINCT a.landmark_id) AS landmark_count,
               count(DISTINCT a.photo_id) AS photo_count,
               max(a.uploaded_at) AS latest_uploaded_at
        FROM album_photos a
        JOIN landmarks l ON l.id = a.landmark_id
        GROUP BY a.user_id, l.country, l.city
        """,
        "Album service interface: the Attractions album's top level, one row per (user, country, city). "
        "photo_count counts distinct photos (a photo of two landmarks in one city counts once).",
    ),
}


def upgrade() -> None:
    op.create_table(
        "landmarks",
        sa.Column("id", sa.BigInteger(), autoincrement=False, nullable=False, comment="Landmark id, as in the dataset and Milvus"),
        sa.Column("name", sa.Text(), nullable=False, comment="Display name"),
        sa.Column("city", sa.Text(), nullable=False, comment="City the landmark is in (album grouping)"),
        sa.Column("country", sa.Text(), nullable=False, comment="Country the landmark is in"),
        sa.Column("region", sa.SmallInteger(), nullable=False, comment="Curriculum region 1-4"),
        sa.Column("lat", sa.Double(), nullable=False, comment="Latitude, degrees"),
        sa.Column("lon", sa.Double(), nullable=False, comment="Longitude, degrees"),
        sa.CheckConstraint("region BETWEEN 1 AND 4", name="ck_landmarks_region_range"),
        sa.PrimaryKeyConstraint("id", name="pk_landmarks"),
        comment="Landmarks the model can recognise.",
    )
    op.create_table(
        "model_versions",
        sa.Column("version", sa.Text(), nullable=False, comment="Model version name (also the Milvus collection suffix)"),
        sa.Column("created_at", TIMESTAMPTZ, server_default=sa.func.now(), nullable=False, comment="When the version was registered"),
        sa.Column("is_active", sa.Boolean(), server_default=sa.text("false"), nullable=False, comment="The version whose tags albums show (at most one)"),
        sa.Column("backbone", sa.Text(), nullable=False, comment="Backbone architecture, e.g. wide_resnet50_2"),
        sa.Column("embedding_dim", sa.Integer(), nullable=False, comment="Embedding dimension"),
        sa.Column("t_geo", sa.REAL(), nullable=False, comment="Acceptance threshold with GPS"),
        sa.Column("t_global", sa.REAL(), nullable=False, comment="Candidate threshold without GPS"),
        sa.Column("t_ref", sa.REAL(), nullable=False, comment="Reference-verification threshold without GPS"),
        sa.Column("checkpoint", sa.Text(), nullable=False, comment="Where the checkpoint lives"),
        sa.Column("metrics", postgresql.JSONB(), server_default=sa.text("'{}'::jsonb"), nullable=False, comment="Evaluation metrics at publish time"),
        sa.PrimaryKeyConstraint("version", name="pk_model_versions"),
        comment="Published recognition models; the album views show only the active one.",
    )
    op.create_index(
        "uq_model_versions_one_active", "model_versions", ["is_active"], unique=True, postgresql_where=sa.text("is_active")
    )
    op.create_table(
        "photos",
        sa.Column("user_id", sa.Text(), nullable=False, comment="Owner"),
        sa.Column("photo_id", sa.Text(), nullable=False, comment="Photo id, unique per user"),
        sa.Column("uri", sa.Text(), nullable=True, comment="Where the bytes were fetched from (NULL for a tombstone never uploaded)"),
        sa.Column("uploaded_at", TIMESTAMPTZ, nullable=True, comment="Upload time from the event"),
        sa.Column("status", sa.Text(), nullable=False, comment="pending | tagged | no_landmark | failed | deleted"),
        sa.Column("model_version", sa.Text(), nullable=True, comment="Model version that last processed the photo"),
        sa.Column("gps_lat", sa.Double(), nullable=True, comment="Latitude used for recognition"),
        sa.Column("gps_lon", sa.Double(), nullable=True, comment="Longitude used for recognition"),
        sa.Column("gps_source", sa.Text(), nullable=True, comment="exif | event"),
        sa.Column("processed_at", TIMESTAMPTZ, nullable=True, comment="When the last event for this photo was applied"),
        sa.Column("deleted_at", TIMESTAMPTZ, nullable=True, comment="When the photo was deleted"),
        sa.CheckConstraint("status IN ('pending', 'tagged', 'no_landmark', 'failed', 'deleted')", name="ck_photos_status"),
        sa.CheckConstraint("gps_source IN ('exif', 'event')", name="ck_photos_gps_source"),
        sa.ForeignKeyConstraint(["model_version"], ["model_versions.version"], name="fk_photos_model_version_model_versions"),
        sa.PrimaryKeyConstraint("user_id", "photo_id", name="pk_photos"),
        comment="One row per user photo seen by the fleet; status 'deleted' is a tombstone.",
    )
    op.create_table(
        "photo_tags",
        sa.Column("user_id", sa.Text(), nullable=False, comment="Owner"),
        sa.Column("photo_id", sa.Text(), nullable=False, comment="Photo id"),
        sa.Column("model_version", sa.Text(), nullable=False, comment="Model version that produced the tag"),
        sa.Column("landmark_id", sa.BigInteger(), nullable=False, comment="Recognised landmark"),
        sa.Column("rank", sa.SmallInteger(), nullable=False, comment="0 = best landmark for the photo"),
        sa.Column("score", sa.REAL(), nullable=False, comment="Similarity of the best centroid"),
        sa.Column("method", sa.Text(), nullable=False, comment="geo (GPS square + t_geo) | reference (t_global + t_ref)"),
        sa.Column("created_at", TIMESTAMPTZ, server_default=sa.func.now(), nullable=False, comment="When the tag was written"),
        sa.CheckConstraint("method IN ('geo', 'reference')", name="ck_photo_tags_method"),
        sa.ForeignKeyConstraint(
            ["user_id", "photo_id"], ["photos.user_id", "photos.photo_id"], ondelete="CASCADE", name="fk_photo_tags_photo"
        ),
        sa.ForeignKeyConstraint(["landmark_id"], ["landmarks.id"], name="fk_photo_tags_landmark_id_landmarks"),
        sa.ForeignKeyConstraint(["model_version"], ["model_versions.version"], name="fk_photo_tags_model_version_model_versions"),
        sa.PrimaryKeyConstraint("user_id", "photo_id", "model_version", "landmark_id", name="pk_photo_tags"),
        comment="Landmarks recognised on a photo, per model version.",
    )
    op.create_index("ix_photo_tags_album", "photo_tags", ["user_id", "landmark_id", "model_version"])
    op.create_table(
        "processed_events",
        sa.Column("event_id", sa.Text(), nullable=False, comment="Event id from the upload pipeline"),
        sa.Column("kind", sa.Text(), nullable=False, comment="uploaded | deleted"),
        sa.Column("user_id", sa.Text(), nullable=False, comment="Owner"),
        sa.Column("photo_id", sa.Text(), nullable=False, comment="Photo id"),
        sa.Column("processed_at", TIMESTAMPTZ, server_default=sa.func.now(), nullable=False, comment="When the event was applied"),
        sa.CheckConstraint("kind IN ('uploaded', 'deleted')", name="ck_processed_events_kind"),
        sa.PrimaryKeyConstraint("event_id", name="pk_processed_events"),
        comment="Idempotency ledger: an event here has been applied and its redelivery changes nothing.",
    )
    op.create_table(
        "failures",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False, comment="Row id"),
        sa.Column("event_key", sa.Text(), nullable=False, comment="event_id, or a hash of a payload without a usable one"),
        sa.Column("event_id", sa.Text(), nullable=True, comment="event_id if the payload had a sane one"),
        sa.Column("user_id", sa.Text(), nullable=True, comment="user_id if the payload had a sane one"),
        sa.Column("photo_id", sa.Text(), nullable=True, comment="photo_id if the payload had a sane one"),
        sa.Column("task", sa.Text(), nullable=False, comment="Celery task name"),
        sa.Column("stage", sa.Text(), nullable=False, comment="Pipeline stage that failed (shared.errors.Stage)"),
        sa.Column("reason", sa.Text(), nullable=False, comment="Why, for a human"),
        sa.Column("payload", postgresql.JSONB(), nullable=True, comment="The event (at most ~8 KB of it)"),
        sa.Column("created_at", TIMESTAMPTZ, server_default=sa.func.now(), nullable=False, comment="When the failure was recorded"),
        sa.PrimaryKeyConstraint("id", name="pk_failures"),
        sa.UniqueConstraint("event_key", name="uq_failures_event_key"),
        comment="Dead letters: events that could not be processed, with the reason.",
    )
    op.create_index("ix_failures_photo", "failures", ["user_id", "photo_id"])

    for name, (select, comment) in VIEWS.items():
        op.execute(f"CREATE VIEW {name} AS {select.strip()}")
        op.execute(sa.text(f"COMMENT ON VIEW {name} IS " + _quote(comment)))


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def downgrade() -> None:
    for name in reversed(VIEWS):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    op.drop_index("ix_failures_photo", table_name="failures")
    op.drop_table("failures")
    op.drop_table("processed_events")
    op.drop_index("ix_photo_tags_album", table_name="photo_tags")
    op.drop_table("photo_tags")
    op.drop_table("photos")
    op.drop_index("uq_model_versions_one_active", table_name="model_versions")
    op.drop_table("model_versions")
    op.drop_table("landmarks")
