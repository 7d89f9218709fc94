"""Read side for the album service: the Attractions album, built only from the documented views."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Row, column, select, table, tuple_
from sqlalchemy.orm import Session

from shared.db.models import FailureRecord, Photo

album_photos = table(
    "album_photos",
    column("user_id"), column("landmark_id"), column("photo_id"), column("uri"),
    column("uploaded_at"), column("score"), column("method"), column("rank"),
)
album_landmarks = table(
    "album_landmarks",
    column("user_id"), column("landmark_id"), column("name"), column("city"), column("country"),
    column("photo_count"), column("cover_photo_id"), column("latest_uploaded_at"),
)
album_cities = table(
    "album_cities",
    column("user_id"), column("country"), column("city"),
    column("landmark_count"), column("photo_count"), column("latest_uploaded_at"),
)


@dataclass(frozen=True)
class LandmarkAlbum:
    landmark_id: int
    name: str
    city: str
    country: str
    photo_count: int
    cover_photo_id: str
    latest_uploaded_at: datetime | None


@dataclass(frozen=True)
class City:
    country: str
    city: str
    landmark_count: int
    photo_count: int
    latest_uploaded_at: datetime | None
    landmarks: list[LandmarkAlbum] = field(default_factory=list)


@dataclass(frozen=True)
class AlbumPhoto:
    photo_id: str
    uri: str
    uploaded_at: datetime
    score: float
    method: str
    rank: int

    @property
    def cursor(self) -> tuple[datetime, str]:
        """Pass as `after=` to get the next page."""
        return (self.uploaded_at, self.photo_id)


# Reads that take several statements see one snapshot: under READ COMMITTED a commit between them would
# show, say, a new city without its landmark albums. READ ONLY: such a read never writes by mistake.
SNAPSHOT = {"isolation_level": "REPEATABLE READ", "postgresql_readonly": True}


def begin_snapshot(session: Session) -> None:
    """Begin the session's transaction as REPEATABLE READ, READ ONLY (SNAPSHOT).

    An isolation level is set before a transaction's first statement, so a transaction the caller has
    already begun (after writes of its own, say) keeps its level: call this first in a transaction."""
    if not session.in_transaction():
        session.connection(execution_options=SNAPSHOT)  # reset when the connection goes back to the pool


def attractions(session: Session, user_id: str) -> list[City]:
    """Cities (by country, city), each with its landmark albums, biggest first. Two reads: begin the
    session with begin_snapshot for a consistent answer (the caller's transaction is its own to choose)."""
    landmarks: dict[tuple[str, str], list[LandmarkAlbum]] = {}
    rows = session.execute(
        select(album_landmarks)
        .where(album_landmarks.c.user_id == user_id)
        .order_by(album_landmarks.c.photo_count.desc(), album_landmarks.c.name, album_landmarks.c.landmark_id)
    )
    for r in rows:
        landmarks.setdefault((r.country, r.city), []).append(
            LandmarkAlbum(r.landmark_id, r.name, r.city, r.country, r.photo_count, r.cover_photo_id, r.latest_uploaded_at)
        )
    cities = session.execute(
        select(album_cities)
        .where(album_cities.c.user_id == user_id)
        .order_by(album_cities.c.country, album_cities.c.city)
    )
    return [
        City(c.country, c.city, c.landmark_count, c.photo_count, c.latest_uploaded_at, landmarks.get((c.country, c.city), []))
        for c in cities
    ]


def landmark_photos(
    session: Session,
    user_id: str,
    landmark_id: int,
    *,
    limit: int = 50,
    after: tuple[datetime, str] | None = None,
) -> list[AlbumPhoto]:
    """One page of a landmark album, newest first; pass the last photo's `cursor` as `after`."""
    a = album_photos.c
    query = select(a.photo_id, a.uri, a.uploaded_at, a.score, a.method, a.rank).where(
        a.user_id == user_id, a.landmark_id == landmark_id
    )
    if after is not None:
        query = query.where(tuple_(a.uploaded_at, a.photo_id) < tuple_(*after))
    query = query.order_by(a.uploaded_at.desc(), a.photo_id.desc()).limit(max(1, min(limit, 1000)))
    return [AlbumPhoto(r.photo_id, r.uri, r.uploaded_at, r.score, r.method, r.rank) for r in session.execute(query)]


def photo_report(session: Session, user_id: str, photo_id: str) -> dict[str, Any] | None:
    """What the fleet knows about one photo: status, visible tags, the failure of its latest attempt, GPS.
    None while nothing about it is recorded (its upload is still queued, or was never sent)."""
    photo = session.execute(
        select(Photo.__table__).where(Photo.user_id == user_id, Photo.photo_id == photo_id)
    ).one_or_none()
    if photo is None:
        return _failed_without_a_photo(session, user_id, photo_id)
    p, lm = album_photos.c, album_landmarks.c
    tags = session.execute(
        select(p.landmark_id, lm.name, lm.city, p.score, p.method)
        .join_from(album_photos, album_landmarks, (lm.user_id == p.user_id) & (lm.landmark_id == p.landmark_id))
        .where(p.user_id == user_id, p.photo_id == photo_id)
        .order_by(p.rank)
    )
    gps = None
    if photo.gps_lat is not None and photo.gps_lon is not None:
        gps = {"lat": photo.gps_lat, "lon": photo.gps_lon, "source": photo.gps_source}
    return {
        "photo_id": photo.photo_id,
        "user_id": photo.user_id,
        "status": photo.status,
        "model_version": photo.model_version,
        "tags": [
            {"landmark_id": t.landmark_id, "name": t.name, "city": t.city, "score": t.score, "method": t.method}
            for t in tags
        ],
        "failure": _latest_failure(session, user_id, photo_id, _since_verdict(photo)),
        "gps": gps,
    }


def _failed_without_a_photo(session: Session, user_id: str, photo_id: str) -> dict[str, Any] | None:
    """A malformed event, or one dead-lettered after an unexpected error, writes no photos row: it will never
    be processed, so it is no 'pending' upload."""
    failure = _latest_failure(session, user_id, photo_id)
    if failure is None:
        return None
    return {"photo_id": photo_id, "user_id": user_id, "status": "failed", "model_version": None, "tags": [],
            "failure": failure, "gps": None}


def _since_verdict(photo: Row) -> ColumnElement[bool]:
    """The failures that concern the photo's current verdict (``photos.processed_at``).

    Any verdict replaces the failures recorded before it (an old upload's, say). A failure recorded after it, a
    failed retry of the same upload that kept the tags, is the latest attempt's: the rule of backfill's
    ``_failed_behind_old_verdict``. A 'failed' verdict's own reason is written in its transaction, at the same
    now()."""
    recorded = FailureRecord.created_at
    return recorded >= photo.processed_at if photo.status == "failed" else recorded > photo.processed_at


def _latest_failure(session: Session, user_id: str, photo_id: str, *conditions: ColumnElement[bool]) -> str | None:
    return session.scalar(
        select(FailureRecord.reason)
        .where(FailureRecord.user_id == user_id, FailureRecord.photo_id == photo_id, *conditions)
        .order_by(FailureRecord.created_at.desc(), FailureRecord.id.desc())
        .limit(1)
    )
