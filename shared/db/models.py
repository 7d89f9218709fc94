"""The PostgreSQL schema as ORM classes; migrations/versions/ is its history, the album views live there."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Double,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    REAL,
    DateTime,
    SmallInteger,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Stable constraint names, so migrations can refer to them.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

PHOTO_STATUSES = ("pending", "tagged", "no_landmark", "failed", "deleted")
TAG_METHODS = ("geo", "reference")
GPS_SOURCES = ("exif", "event")
EVENT_KINDS = ("uploaded", "deleted")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: DateTime(timezone=True)}


class Landmark(Base):
    __tablename__ = "landmarks"
    __table_args__ = (
        CheckConstraint("region BETWEEN 1 AND 4", name="region_range"),
        Index("ix_landmarks_city", "country", "city"),  # a city's landmarks: recounting a user's city album
        {"comment": "Landmarks the model can recognise."},
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False, comment="Landmark id, as in the dataset and Milvus")
    name: Mapped[str] = mapped_column(Text, comment="Display name")
    city: Mapped[str] = mapped_column(Text, comment="City the landmark is in (album grouping)")
    country: Mapped[str] = mapped_column(Text, comment="Country the landmark is in")
    region: Mapped[int] = mapped_column(SmallInteger, comment="Curriculum region 1-4")
    lat: Mapped[float] = mapped_column(Double, comment="Latitude, degrees")
    lon: Mapped[float] = mapped_column(Double, comment="Longitude, degrees")


class ModelVersion(Base):
    __tablename__ = "model_versions"
    __table_args__ = (
        Index("uq_model_versions_one_active", "is_active", unique=True, postgresql_where=text("is_active")),
        {"comment": "Published recognition models; the album views show only the active one."},
    )

    version: Mapped[str] = mapped_column(Text, primary_key=True, comment="Model version name (also the Milvus collection suffix)")
    created_at: Mapped[datetime] = mapped_column(server_default=func.now(), comment="When the version was registered")
    is_active: Mapped[bool] = mapped_column(server_default=text("false"), comment="The version whose tags albums show (at most one)")
    backbone: Mapped[str] = mapped_column(Text, comment="Backbone architecture, e.g. wide_resnet50_2")
    embedding_dim: Mapped[int] = mapped_column(Integer, comment="Embedding dimension")
    t_geo: Mapped[float] = mapped_column(REAL, comment="Acceptance threshold with GPS")
    t_global: Mapped[float] = mapped_column(REAL, comment="Candidate threshold without GPS")
    t_ref: Mapped[float] = mapped_column(REAL, comment="Reference-verification threshold without GPS")
    checkpoint: Mapped[str] = mapped_column(Text, comment="Where the checkpoint lives")
    metrics: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"), comment="Evaluation metrics at publish time")


class Photo(Base):
    __tablename__ = "photos"
    __table_args__ = (
        CheckConstraint(_in("status", PHOTO_STATUSES), name="status"),
        CheckConstraint(_in("gps_source", GPS_SOURCES), name="gps_source"),
        # `landmarks backfill --since DATE`: counts the photos uploaded since DATE, then pages through them
        # in this order (backfill.Scope.keyset).
        Index("ix_photos_upload_order", "uploaded_at", "user_id", "photo_id"),
        {"comment": "One row per user photo seen by the fleet; status 'deleted' is a tombstone."},
    )

    user_id: Mapped[str] = mapped_column(Text, primary_key=True, comment="Owner")
    photo_id: Mapped[str] = mapped_column(Text, primary_key=True, comment="Photo id, unique per user")
    uri: Mapped[str | None] = mapped_column(Text, comment="Where the bytes were fetched from (NULL for a tombstone never uploaded)")
    uploaded_at: Mapped[datetime | None] = mapped_column(comment="Upload time from the event")
    status: Mapped[str] = mapped_column(Text, comment="pending | tagged | no_landmark | failed | deleted")
    model_version: Mapped[str | None] = mapped_column(ForeignKey("model_versions.version"), comment="Model version that last processed the photo")
    gps_lat: Mapped[float | None] = mapped_column(Double, comment="Latitude used for recognition")
    gps_lon: Mapped[float | None] = mapped_column(Double, comment="Longitude used for recognition")
    gps_source: Mapped[str | None] = mapped_column(Text, comment="exif | event")
    processed_at: Mapped[datetime | None] = mapped_column(comment="When the last event for this photo was applied")
    deleted_at: Mapped[datetime | None] = mapped_column(comment="When the photo was deleted")
    upload_replaced: Mapped[bool] = mapped_column(
        server_default=text("false"),
        comment="Whether the last upload written replaced another one (every version's tags of it were dropped)")


class PhotoTag(Base):
    __tablename__ = "photo_tags"
    __table_args__ = (
        ForeignKeyConstraint(
            ["user_id", "photo_id"], ["photos.user_id", "photos.photo_id"], ondelete="CASCADE", name="fk_photo_tags_photo"
        ),
        CheckConstraint(_in("method", TAG_METHODS), name="method"),
        Index("ix_photo_tags_album", "user_id", "landmark_id", "model_version"),
        {"comment": "Landmarks recognised on a photo, per model version."},
    )

    user_id: Mapped[str] = mapped_column(Text, primary_key=True, comment="Owner")
    photo_id: Mapped[str] = mapped_column(Text, primary_key=True, comment="Photo id")
    model_version: Mapped[str] = mapped_column(ForeignKey("model_versions.version"), primary_key=True, comment="Model version that produced the tag")
    landmark_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("landmarks.id"), primary_key=True, comment="Recognised landmark")
    rank: Mapped[int] = mapped_column(SmallInteger, comment="0 = best landmark for the photo")
    score: Mapped[float] = mapped_column(REAL, comment="Similarity of the best centroid")
    method: Mapped[str] = mapped_column(Text, comment="geo (GPS square + t_geo) | reference (t_global + t_ref)")
    created_at: Mapped[datetime] = mapped_column(server_default=func.now(), comment="When the tag was written")


class ProcessedEvent(Base):
    __tablename__ = "processed_events"
    __table_args__ = (
        CheckConstraint(_in("kind", EVENT_KINDS), name="kind"),
        # `landmarks prune-ledger`: rows are appended in time order, so BRIN finds the old ones (migration 0008).
        Index("ix_processed_events_processed_at", "processed_at", postgresql_using="brin",
              postgresql_with={"autosummarize": "on"}),
        {"comment": "Idempotency ledger: an event here has been applied and its redelivery changes nothing."},
    )

    event_id: Mapped[str] = mapped_column(Text, primary_key=True, comment="Event id from the upload pipeline")
    kind: Mapped[str] = mapped_column(Text, comment="uploaded | deleted")
    user_id: Mapped[str] = mapped_column(Text, comment="Owner")
    photo_id: Mapped[str] = mapped_column(Text, comment="Photo id")
    processed_at: Mapped[datetime] = mapped_column(server_default=func.now(), comment="When the event was applied")


class FailureRecord(Base):
    __tablename__ = "failures"
    __table_args__ = (
        Index("ix_failures_photo", "user_id", "photo_id"),
        {"comment": "Dead letters: events that could not be processed, with the reason."},
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True, comment="Row id")
    event_key: Mapped[str] = mapped_column(Text, unique=True, comment="event_id, or a hash of a payload without a usable one")
    event_id: Mapped[str | None] = mapped_column(Text, comment="event_id if the payload had a sane one")
    user_id: Mapped[str | None] = mapped_column(Text, comment="user_id if the payload had a sane one")
    photo_id: Mapped[str | None] = mapped_column(Text, comment="photo_id if the payload had a sane one")
    task: Mapped[str] = mapped_column(Text, comment="Celery task name")
    stage: Mapped[str] = mapped_column(Text, comment="Pipeline stage that failed (shared.errors.Stage)")
    reason: Mapped[str] = mapped_column(Text, comment="Why, for a human")
    payload: Mapped[Any | None] = mapped_column(JSONB, comment="The event (at most ~8 KB of it)")
    created_at: Mapped[datetime] = mapped_column(server_default=func.now(), comment="When the failure was recorded")


class ModelActivation(Base):
    __tablename__ = "model_activations"
    __table_args__ = (
        {"comment": "History of the active model version (written by a trigger); `landmarks rollback` replays it."},
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True, comment="Order of activation")
    version: Mapped[str] = mapped_column(ForeignKey("model_versions.version", ondelete="CASCADE"),
                                         comment="The version that became active")
    previous_version: Mapped[str | None] = mapped_column(Text, comment="The version recorded as active before it")
    action: Mapped[str] = mapped_column(Text, comment="activate (publish, SQL) | promote | rollback | initial")
    actor: Mapped[str] = mapped_column(Text, comment="Who: the CLI's user@host, else the database user")
    activated_at: Mapped[datetime] = mapped_column(server_default=func.now(), comment="When")


class AlbumUser(Base):
    __tablename__ = "album_users"
    __table_args__ = (
        {"comment": "One row per user with albums: locked, in user order, by every transaction that changes "
                    "the user's album summaries.",
         "postgresql_with": {"fillfactor": "80"}},
    )

    user_id: Mapped[str] = mapped_column(Text, primary_key=True, comment="Owner")
    changed_at: Mapped[datetime] = mapped_column(server_default=func.now(),
                                                 comment="When a transaction last locked it to change the user's albums")


class AlbumLandmarkStats(Base):
    __tablename__ = "album_landmark_stats"
    __table_args__ = (
        Index("ix_album_landmark_stats_landmark", "landmark_id"),  # a landmark moved to another city: its albums
        {"comment": "Summary of each (user, model version, landmark) album, kept by triggers; read by album_landmarks.",
         "postgresql_with": {"fillfactor": "80"}},
    )

    user_id: Mapped[str] = mapped_column(Text, primary_key=True, comment="Owner")
    model_version: Mapped[str] = mapped_column(Text, primary_key=True, comment="Model version whose tags are summarised")
    landmark_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False, comment="Landmark of the album")
    photo_count: Mapped[int] = mapped_column(BigInteger, comment="Photos in the album that are not deleted")
    cover_photo_id: Mapped[str] = mapped_column(Text, comment="Highest score, then newest upload, then highest photo_id")
    latest_uploaded_at: Mapped[datetime | None] = mapped_column(comment="Newest upload in the album")


class AlbumCityStats(Base):
    __tablename__ = "album_city_stats"
    __table_args__ = (
        {"comment": "Summary of each (user, model version, city), kept by triggers; read by album_cities.",
         "postgresql_with": {"fillfactor": "80"}},
    )

    user_id: Mapped[str] = mapped_column(Text, primary_key=True, comment="Owner")
    model_version: Mapped[str] = mapped_column(Text, primary_key=True, comment="Model version whose tags are summarised")
    country: Mapped[str] = mapped_column(Text, primary_key=True, comment="Country of the city")
    city: Mapped[str] = mapped_column(Text, primary_key=True, comment="City (landmarks.city)")
    landmark_count: Mapped[int] = mapped_column(BigInteger, comment="Landmarks of the city with photos")
    photo_count: Mapped[int] = mapped_column(BigInteger, comment="Distinct photos of the city that are not deleted")
    latest_uploaded_at: Mapped[datetime | None] = mapped_column(comment="Newest upload in the city")


BACKFILL_STATUSES = ("running", "done")


class BackfillJob(Base):
    __tablename__ = "backfill_jobs"
    __table_args__ = (
        CheckConstraint(_in("status", BACKFILL_STATUSES), name="status"),
        {"comment": "Resumable backfills: `landmarks backfill` re-enqueues stored photos for the active version."},
    )

    name: Mapped[str] = mapped_column(Text, primary_key=True, comment="Job name: the same command resumes the same job")
    scope: Mapped[dict[str, Any]] = mapped_column(JSONB, comment="Which photos: {user} | {since} | {all}")
    model_version: Mapped[str | None] = mapped_column(Text, comment="Active version when the job started")
    cursor_uploaded_at: Mapped[datetime | None] = mapped_column(comment="Keyset cursor of a --since job: last enqueued photo's upload time")
    cursor_user_id: Mapped[str | None] = mapped_column(Text, comment="Keyset cursor: last enqueued photo's user")
    cursor_photo_id: Mapped[str | None] = mapped_column(Text, comment="Keyset cursor: last enqueued photo")
    enqueued: Mapped[int] = mapped_column(BigInteger, server_default=text("0"), comment="Events sent so far")
    total: Mapped[int | None] = mapped_column(BigInteger, comment="Photos in scope when the job started")
    rate: Mapped[float | None] = mapped_column(REAL, comment="Events per second asked for by the last run")
    status: Mapped[str] = mapped_column(Text, comment="running | done")
    created_at: Mapped[datetime] = mapped_column(server_default=func.now(), comment="When it started")
    updated_at: Mapped[datetime] = mapped_column(server_default=func.now(), comment="Last progress")
    finished_at: Mapped[datetime | None] = mapped_column(comment="When it enqueued its last photo")


SHADOW_STOP_REASONS = ("stopped", "promoted", "replaced")


class ShadowRollout(Base):
    __tablename__ = "shadow_rollouts"
    __table_args__ = (
        CheckConstraint("share > 0 AND share <= 1", name="share_range"),
        CheckConstraint(_in("stop_reason", SHADOW_STOP_REASONS), name="stop_reason"),
        # At most one shadow runs at a time: workers embed a sample with exactly one candidate.
        Index("uq_shadow_rollouts_one_running", text("(stopped_at IS NULL)"), unique=True,
              postgresql_where=text("stopped_at IS NULL")),
        {"comment": "Shadow runs: a candidate version tags a sampled share of live uploads beside the "
                    "active one; the running one has no stopped_at."},
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True, comment="Order of start")
    version: Mapped[str] = mapped_column(ForeignKey("model_versions.version", ondelete="CASCADE"),
                                         comment="The candidate version")
    share: Mapped[float] = mapped_column(Double, comment="Share of photos sampled, in (0, 1]")
    actor: Mapped[str] = mapped_column(Text, comment="Who started it: the CLI's user@host")
    started_at: Mapped[datetime] = mapped_column(server_default=func.now(), comment="When it started")
    stopped_at: Mapped[datetime | None] = mapped_column(comment="When it stopped; NULL while it runs")
    stop_reason: Mapped[str | None] = mapped_column(Text, comment="stopped | promoted | replaced (another shadow started)")


class ShadowPhoto(Base):
    __tablename__ = "shadow_photos"
    __table_args__ = (
        ForeignKeyConstraint(
            ["user_id", "photo_id"], ["photos.user_id", "photos.photo_id"], ondelete="CASCADE",
            name="fk_shadow_photos_photo"
        ),
        Index("ix_shadow_photos_version", "model_version"),
        {"comment": "Photos a shadow version has processed, tagged or not, so that `landmarks compare` "
                    "counts its 'no landmark' verdicts as seen."},
    )

    user_id: Mapped[str] = mapped_column(Text, primary_key=True, comment="Owner")
    photo_id: Mapped[str] = mapped_column(Text, primary_key=True, comment="Photo id")
    model_version: Mapped[str] = mapped_column(ForeignKey("model_versions.version", ondelete="CASCADE"),
                                               primary_key=True, comment="The shadow version")
    processed_at: Mapped[datetime] = mapped_column(server_default=func.now(),
                                                   comment="When the shadow last processed the photo")
