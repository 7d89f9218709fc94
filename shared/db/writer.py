"""The tag writer: applies a batch of recognition outcomes in one transaction, idempotently."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

import orjson
from sqlalchemy import delete, func, literal, select, text, tuple_, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from shared.db.models import (
    FailureRecord,
    ModelVersion,
    Photo,
    PhotoTag,
    ProcessedEvent,
    ShadowPhoto,
    ShadowRollout,
)
from shared.errors import InfrastructureError
from shared.events import PhotoDeleted, event_key, payload_summary, safe_field
from shared.fetch import without_credentials
from shared.outcomes import PhotoOutcome, PhotoStatus

MAX_PAYLOAD_CHARS = 8 * 1024
MAX_REASON_CHARS = 4 * 1024
UPLOAD_TASK = "landmarks.photo_uploaded"
ACTIVATE_LOCK = "landmarks.model_versions.activate"

photos = Photo.__table__
photo_tags = PhotoTag.__table__
processed_events = ProcessedEvent.__table__
failures = FailureRecord.__table__
shadow_rollouts = ShadowRollout.__table__
shadow_photos = ShadowPhoto.__table__


# A batch's statements take its rows as one JSON parameter, an array of arrays, and read it on the server. Their
# SQL text never changes, so nothing is compiled per batch: building and compiling 64-row VALUES lists was
# most of the write's cost, in the worker's Python (BENCHMARKS.md, fourth session). One JSON text (orjson,
# about 0.4 ms for 256 photos) replaced a Python list per column, which psycopg2 adapted element by element
# into array literals (about 2 ms for the same photos, with the worker's GIL held; twelfth session).
# In the caller's (sorted) order too: two batches holding the same redelivered events wait, not deadlock.
CLAIM_EVENTS = text("""
    INSERT INTO processed_events (event_id, kind, user_id, photo_id)
    SELECT r->>0, 'uploaded', r->>1, r->>2 FROM jsonb_array_elements(CAST(:rows AS jsonb)) WITH ORDINALITY AS t(r, n)
    ORDER BY n
    ON CONFLICT (event_id) DO NOTHING
    RETURNING event_id""")
# WITH ORDINALITY ... ORDER BY keeps the rows in the caller's (sorted) order: a fixed lock order, so that
# concurrent batches cannot deadlock. A tombstone stays: an upload redelivered after its deletion must not
# bring the photo back. An older upload of the photo changes nothing either: a backfill event carries the
# upload it was queued for, and a handed-back event comes back 30 s late, both possibly after a re-upload.
# And a failure never replaces a verdict on the same upload: a backfill that meets a storage outage leaves
# the photo's tags as they were (its failure is recorded all the same).
# upload_replaced says the row held another upload before; DO UPDATE SET reads the row it locked, the latest
# committed one (a subquery would read this statement's snapshot, blind to an upload committed meanwhile).
UPSERT_PHOTOS = text("""
    INSERT INTO photos (user_id, photo_id, uri, uploaded_at, status, model_version, gps_lat, gps_lon,
                        gps_source, processed_at)
    SELECT r->>0, r->>1, r->>2, CAST(r->>3 AS timestamptz), r->>4, :model_version, CAST(r->>5 AS float8),
           CAST(r->>6 AS float8), r->>7, now()
    FROM jsonb_array_elements(CAST(:rows AS jsonb)) WITH ORDINALITY AS t(r, n)
    ORDER BY n
    ON CONFLICT (user_id, photo_id) DO UPDATE SET
        uri = EXCLUDED.uri, uploaded_at = EXCLUDED.uploaded_at, status = EXCLUDED.status,
        model_version = EXCLUDED.model_version, gps_lat = EXCLUDED.gps_lat, gps_lon = EXCLUDED.gps_lon,
        gps_source = EXCLUDED.gps_source, processed_at = EXCLUDED.processed_at,
        upload_replaced = (photos.uri, photos.uploaded_at) IS DISTINCT FROM (EXCLUDED.uri, EXCLUDED.uploaded_at)
    WHERE photos.status <> 'deleted' AND (photos.uploaded_at IS NULL OR EXCLUDED.uploaded_at >= photos.uploaded_at)
      AND NOT (EXCLUDED.status = 'failed' AND photos.status IN ('tagged', 'no_landmark')
               AND photos.uri = EXCLUDED.uri AND photos.uploaded_at = EXCLUDED.uploaded_at)
    RETURNING user_id, photo_id, upload_replaced AS replaced""")
# This version's tags of the applied photos; every version's where the photo now holds another upload: a
# rollback, or promoting a shadow, would otherwise show the old picture's landmarks on the new one.
CLEAR_TAGS = text("""
    DELETE FROM photo_tags AS t
    USING jsonb_array_elements(CAST(:rows AS jsonb)) AS r
    WHERE t.user_id = r->>0 AND t.photo_id = r->>1
      AND (t.model_version = :model_version OR CAST(r->>2 AS boolean))""")
# A shadow's verdict on the old upload is no verdict on the new one (`landmarks compare` counts it as seen).
# The shadow's photos that hold the upload its events carry (uploaded_at cast as the upsert casts it), share-
# locked in a fixed order: a concurrent deletion waits for the shadow's transaction, then drops its tags too.
LOCK_SAME_UPLOADS = text("""
    SELECT p.user_id, p.photo_id
    FROM photos p
    JOIN jsonb_array_elements(CAST(:rows AS jsonb)) AS r ON p.user_id = r->>0 AND p.photo_id = r->>1
    WHERE p.status <> 'deleted' AND p.uri = r->>2 AND p.uploaded_at = CAST(r->>3 AS timestamptz)
    ORDER BY p.user_id, p.photo_id
    FOR SHARE OF p""")
FORGET_SHADOW_VERDICTS = text("""
    DELETE FROM shadow_photos
    WHERE (user_id, photo_id) IN (SELECT r->>0, r->>1 FROM jsonb_array_elements(CAST(:rows AS jsonb)) AS t(r))""")
# A landmark listed twice keeps its first (best) rank.
INSERT_TAGS = text("""
    INSERT INTO photo_tags (user_id, photo_id, model_version, landmark_id, rank, score, method)
    SELECT r->>0, r->>1, :model_version, CAST(r->>2 AS bigint), CAST(r->>3 AS smallint), CAST(r->>4 AS real),
           r->>5
    FROM jsonb_array_elements(CAST(:rows AS jsonb)) AS t(r)
    ON CONFLICT DO NOTHING""")


def write_outcomes(
    session: Session, model_version: str, outcomes: list[PhotoOutcome], task: str = UPLOAD_TASK
) -> int:
    """Returns how many events were newly applied; redelivered events and deleted photos change nothing."""
    by_event: dict[str, PhotoOutcome] = {}
    for outcome in outcomes:
        by_event.setdefault(outcome.event.event_id, outcome)
    if not by_event:
        return 0

    # Claiming the event ids first makes a concurrent redelivery wait here, then skip.
    claimed = set(session.scalars(CLAIM_EVENTS, {"rows": _json_rows(
        sorted((o.event.event_id, o.event.user_id, o.event.photo_id) for o in by_event.values()))}))
    # Two events for one photo in a batch: one row may be upserted once per statement, so one is chosen as
    # UPSERT_PHOTOS would leave the row after both (_supersedes).
    by_photo: dict[tuple[str, str], PhotoOutcome] = {}
    for event_id, outcome in by_event.items():
        key = (outcome.event.user_id, outcome.event.photo_id)
        if event_id in claimed and (key not in by_photo or _supersedes(outcome, by_photo[key])):
            by_photo[key] = outcome
    if not by_photo:
        return 0

    failed = _record_failed(session, task, [o for event_id, o in by_event.items()
                                            if event_id in claimed and o.status == PhotoStatus.FAILED])
    applied = _upsert_photos(session, model_version, by_photo)
    if failed:  # after the upsert, which waits for a delete of these photos running meanwhile
        session.execute(FORGET_GPS_OF_DELETED, {"keys": failed})
    if not applied:
        return 0
    keys = sorted(applied)
    session.execute(CLEAR_TAGS, {"model_version": model_version,
                                 "rows": _json_rows([(*key, applied[key]) for key in keys])})
    replaced = [key for key in keys if applied[key]]
    if replaced:
        session.execute(FORGET_SHADOW_VERDICTS, {"rows": _json_rows(replaced)})
    tags = [(user_id, photo_id, int(tag.landmark_id), rank, float(tag.score), str(tag.method))
            for user_id, photo_id in keys for rank, tag in enumerate(by_photo[(user_id, photo_id)].tags)]
    if tags:
        session.execute(INSERT_TAGS, {"model_version": model_version, "rows": _json_rows(tags)})
    # Events superseded, aimed at a tombstone, or failing where a verdict stands count as seen but not applied.
    return len(applied)


def _supersedes(later: PhotoOutcome, earlier: PhotoOutcome) -> bool:
    """Whether ``later`` (in the batch) takes the photo from ``earlier``, as it would in the next batch: the
    later upload wins, the later in the batch between equals, except that a failure never replaces a verdict
    on the same upload (its failure is recorded all the same, by _record_failed)."""
    if later.event.uploaded_at != earlier.event.uploaded_at:
        return later.event.uploaded_at > earlier.event.uploaded_at
    verdict = earlier.status in (PhotoStatus.TAGGED, PhotoStatus.NO_LANDMARK)
    return not (later.status == PhotoStatus.FAILED and verdict and later.event.uri == earlier.event.uri)


def write_live_outcomes(session: Session, model_version: str, outcomes: list[PhotoOutcome]) -> int:
    """write_outcomes for a worker's batch: refused (InfrastructureError, so the batch is retried under the
    version now active) when ``model_version`` is no longer the active one. A batch in flight during a
    promote would otherwise tag its photos under the old version only, out of every album."""
    if not _holds_active(session, model_version):
        raise InfrastructureError(f"model version {model_version!r} is not the active version in PostgreSQL: a "
                                  "promote or rollback is under way, or was left half-done (`landmarks health`); "
                                  "the batch is retried under the version the alias names")
    return write_outcomes(session, model_version, outcomes)


def _holds_active(session: Session, version: str) -> bool:
    # FOR SHARE: an activation's update of this row waits for this transaction, or this read for the
    # activation's commit, after which it sees the row as the activation left it.
    table = ModelVersion.__table__
    return bool(session.scalar(select(table.c.is_active).where(table.c.version == version)
                               .with_for_update(read=True)))


def _record_failed(session: Session, task: str, failed: list[PhotoOutcome]) -> list[str]:
    """Every claimed event that failed, whether or not its photo's row took the failure; their keys."""
    rows = [
        _failure_row(
            key=o.event.event_id,
            event_id=o.event.event_id,
            user_id=o.event.user_id,
            photo_id=o.event.photo_id,
            task=task,
            stage=str(o.failure.stage) if o.failure else "write",
            reason=o.failure.reason if o.failure else "failed without a recorded reason",
            payload=o.event.model_dump(mode="json"),
        )
        for o in failed
    ]
    if rows:
        session.execute(insert(failures).values(rows).on_conflict_do_nothing(index_elements=["event_key"]))
    return [row["event_key"] for row in rows]


def _upsert_photos(
    session: Session, model_version: str, by_photo: dict[tuple[str, str], PhotoOutcome]
) -> dict[tuple[str, str], bool]:
    """{(user_id, photo_id): whether it replaced another upload} of the rows written."""
    rows = []
    for (user_id, photo_id), o in sorted(by_photo.items()):  # a fixed lock order: no deadlock between batches
        gps = o.gps
        rows.append((user_id, photo_id, o.event.uri, o.event.uploaded_at, str(o.status),
                     gps.lat if gps else None, gps.lon if gps else None,
                     str(o.gps_source) if gps and o.gps_source else None))
    result = session.execute(UPSERT_PHOTOS, {"model_version": model_version, "rows": _json_rows(rows)})
    return {(r.user_id, r.photo_id): r.replaced for r in result}


def _json_rows(rows: list[tuple]) -> str:
    """Rows as one JSON array of arrays (datetimes in ISO 8601 with their offset, None as null)."""
    return orjson.dumps(rows).decode()


def _columns(names: tuple[str, ...], rows: list[tuple]) -> dict[str, list]:
    """Rows turned into one list per column, each bound to the unnest statements as an array."""
    return {name: list(column) for name, column in zip(names, zip(*rows))}


def delete_photo(session: Session, event: PhotoDeleted) -> bool:
    """Tombstones the photo and drops its tags (all versions). False if the event was already applied."""
    claimed = session.scalar(
        insert(processed_events)
        .values(event_id=event.event_id, kind="deleted", user_id=event.user_id, photo_id=event.photo_id)
        .on_conflict_do_nothing(index_elements=["event_id"])
        .returning(processed_events.c.event_id)
    )
    if claimed is None:
        return False
    stmt = insert(photos).values(
        user_id=event.user_id,
        photo_id=event.photo_id,
        status=PhotoStatus.DELETED.value,
        processed_at=func.now(),
        deleted_at=func.now(),
    )
    # Location is personal data: a deleted photo keeps no GPS.
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=["user_id", "photo_id"],
            set_={
                "status": PhotoStatus.DELETED.value,
                "processed_at": func.now(),
                "deleted_at": func.coalesce(photos.c.deleted_at, func.now()),
                "gps_lat": None,
                "gps_lon": None,
                "gps_source": None,
            },
        )
    )
    for table in (photo_tags, shadow_photos):  # no version's verdict on it is left to count
        session.execute(delete(table).where(table.c.user_id == event.user_id, table.c.photo_id == event.photo_id))
    session.execute(FORGET_FAILURE_GPS, {"user_id": event.user_id, "photo_id": event.photo_id})
    return True


# Nor do its failures' copies of its events: their gps, or the cut-off text of one too long to keep whole,
# which may hold it; those recorded later too (an upload that failed after the photo was deleted).
_WITHOUT_GPS = ("CASE WHEN jsonb_typeof(f.payload) = 'object' "
                "THEN f.payload - 'gps' - 'truncated' - 'unserialisable' END")
FORGET_FAILURE_GPS = text(f"""
    UPDATE failures f SET payload = {_WITHOUT_GPS}
    WHERE f.user_id = :user_id AND f.photo_id = :photo_id AND f.payload IS NOT NULL""")
FORGET_GPS_OF_DELETED = text(f"""
    UPDATE failures f SET payload = {_WITHOUT_GPS}
    FROM photos p
    WHERE f.event_key = ANY(:keys) AND f.payload IS NOT NULL
      AND p.user_id = f.user_id AND p.photo_id = f.photo_id AND p.status = 'deleted'""")


def record_failure(session: Session, *, payload: Any, task: str, stage: str, reason: str) -> None:
    """Dead-letters a malformed event; recording the same payload twice keeps one row."""
    row = _failure_row(
        key=event_key(payload),
        event_id=safe_field(payload, "event_id"),
        user_id=safe_field(payload, "user_id"),
        photo_id=safe_field(payload, "photo_id"),
        task=task,
        stage=str(stage),
        reason=reason,
        payload=payload,
    )
    session.execute(insert(failures).values(row).on_conflict_do_nothing(index_elements=["event_key"]))
    if row["user_id"] is not None and row["photo_id"] is not None:
        session.execute(FORGET_GPS_OF_DELETED, {"keys": [row["event_key"]]})


def _failure_row(
    *, key: str, event_id: str | None, user_id: str | None, photo_id: str | None, task: str, stage: str, reason: str, payload: Any
) -> dict[str, Any]:
    return {
        "event_key": _clean(key),
        "event_id": _clean(event_id),
        "user_id": _clean(user_id),
        "photo_id": _clean(photo_id),
        "task": _clean(task),
        "stage": _clean(stage),
        "reason": _clean(reason)[:MAX_REASON_CHARS],
        "payload": _bounded_payload(payload),
    }


# PostgreSQL text and jsonb hold neither NUL nor a lone surrogate (which psycopg2 cannot even encode, and jsonb
# refuses as an escape); hostile payloads carry both, and the broker's json.loads keeps an escaped "\ud800".
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return _UNSTORABLE.sub("\ufffd", value)
    if isinstance(value, dict):
        return {_clean(str(k)): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


# Failure rows are kept for support, for good: a presigned URL's signature, or a password in a URI, kept there
# would stay a credential for anyone who can read the table (the fetch already read the photo with it).
_URI_FIELDS = ("uri", "preview_uri")


def _bounded_payload(payload: Any) -> Any:
    if payload is None:
        return None
    if isinstance(payload, bytes):
        payload = payload.decode("utf-8", errors="replace")
    if isinstance(payload, dict):
        payload = {k: without_credentials(v) if k in _URI_FIELDS and isinstance(v, str) else v
                   for k, v in payload.items()}
    try:
        raw = json.dumps(payload, default=str, allow_nan=False)
        if len(raw) > MAX_PAYLOAD_CHARS:
            return _clean({"truncated": raw[:MAX_PAYLOAD_CHARS]})
        return _clean(json.loads(raw))
    except (ValueError, TypeError, RecursionError):  # NaN, or nested deeper than json or _clean walks
        return _clean({"unserialisable": payload_summary(payload)[:MAX_PAYLOAD_CHARS]})


# A gallery's landmarks as one array per column (not the hot path): a VALUES list of 333,000 landmarks (a
# million centroids) is 2.3 million bind parameters, which SQLAlchemy took many minutes to compile; chunks
# keep each statement a few MB.
UPSERT_LANDMARKS = text("""
    INSERT INTO landmarks (id, name, city, country, region, lat, lon)
    SELECT * FROM unnest(CAST(:ids AS bigint[]), CAST(:names AS text[]), CAST(:cities AS text[]),
                         CAST(:countries AS text[]), CAST(:regions AS smallint[]), CAST(:lats AS float8[]),
                         CAST(:lons AS float8[]))
    ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, city = EXCLUDED.city, country = EXCLUDED.country,
        region = EXCLUDED.region, lat = EXCLUDED.lat, lon = EXCLUDED.lon""")
LANDMARKS_PER_STATEMENT = 50_000


def upsert_landmarks(session: Session, rows: Iterable[dict[str, Any]]) -> int:
    fields = ("id", "name", "city", "country", "region", "lat", "lon")
    values = [tuple(row[f] for f in fields) for row in rows]
    for start in range(0, len(values), LANDMARKS_PER_STATEMENT):
        session.execute(UPSERT_LANDMARKS, _columns(("ids", "names", "cities", "countries", "regions", "lats", "lons"),
                                                   values[start:start + LANDMARKS_PER_STATEMENT]))
    return len(values)


def register_model_version(
    session: Session,
    version: str,
    *,
    backbone: str,
    embedding_dim: int,
    t_geo: float,
    t_global: float,
    t_ref: float,
    checkpoint: str,
    metrics: dict[str, Any],
    activate: bool = False,
) -> ModelVersion:
    table = ModelVersion.__table__
    values = {
        "backbone": backbone,
        "embedding_dim": embedding_dim,
        "t_geo": t_geo,
        "t_global": t_global,
        "t_ref": t_ref,
        "checkpoint": checkpoint,
        "metrics": _clean(metrics),
    }
    session.execute(
        insert(table).values(version=version, **values).on_conflict_do_update(index_elements=["version"], set_=values)
    )
    if activate:
        activate_model_version(session, version)
    return session.scalars(
        select(ModelVersion).where(ModelVersion.version == version).execution_options(populate_existing=True)
    ).one()


def activate_model_version(session: Session, version: str) -> None:
    """Makes `version` the one the album views show; raises LookupError for an unknown version."""
    # Serialises concurrent activations: each then sees the other's committed switch.
    session.execute(select(func.pg_advisory_xact_lock(func.hashtext(literal(ACTIVATE_LOCK)))))
    table = ModelVersion.__table__
    if session.scalar(select(table.c.version).where(table.c.version == version).with_for_update()) is None:
        raise LookupError(f"unknown model version {version!r}")
    # Two statements: the partial unique index is checked row by row, so deactivate before activating.
    session.execute(update(table).where(table.c.is_active, table.c.version != version).values(is_active=False))
    session.execute(update(table).where(table.c.version == version).values(is_active=True))


def active_model_version(session: Session) -> ModelVersion | None:
    return session.scalars(
        select(ModelVersion).where(ModelVersion.is_active).execution_options(populate_existing=True)
    ).one_or_none()


# --- shadow rollouts: a candidate version tagging a sample beside the active one -------------------

def running_shadow(session: Session) -> ShadowRollout | None:
    return session.scalars(
        select(ShadowRollout).where(ShadowRollout.stopped_at.is_(None)).execution_options(populate_existing=True)
    ).one_or_none()


def start_shadow_rollout(session: Session, version: str, share: float, actor: str) -> ShadowRollout:
    """Makes ``version`` the running shadow (a running one is stopped as replaced); raises LookupError for
    an unknown version and ValueError for the active one or a share outside (0, 1]."""
    # The activation lock: a promotion (which ends the shadow of the version it activates) and a shadow
    # start cannot interleave and leave one version both active and shadow.
    session.execute(select(func.pg_advisory_xact_lock(func.hashtext(literal(ACTIVATE_LOCK)))))
    if not 0 < share <= 1:
        raise ValueError(f"shadow share must be in (0, 1], got {share}")
    row = session.get(ModelVersion, version, populate_existing=True)
    if row is None:
        raise LookupError(f"unknown model version {version!r}")
    if row.is_active:
        raise ValueError(f"model version {version!r} is the active one: a shadow must be another version")
    running = running_shadow(session)
    if running is not None and (running.version, running.share) == (version, share):
        return running  # re-running the same command changes nothing
    stop_shadow_rollout(session, reason="replaced")
    session.execute(insert(shadow_rollouts).values(version=version, share=share, actor=actor))
    shadow = running_shadow(session)
    assert shadow is not None
    return shadow


def stop_shadow_rollout(session: Session, *, reason: str = "stopped",
                        version: str | None = None) -> ShadowRollout | None:
    """Stops the running shadow (only if it is ``version``, given one); returns it, or None if none ran.
    Shadow writes committed after this commits find no running shadow and write nothing."""
    stmt = update(shadow_rollouts).where(shadow_rollouts.c.stopped_at.is_(None))
    if version is not None:
        stmt = stmt.where(shadow_rollouts.c.version == version)
    stopped_id = session.scalar(stmt.values(stopped_at=func.now(), stop_reason=reason)
                                .returning(shadow_rollouts.c.id))
    return session.get(ShadowRollout, stopped_id, populate_existing=True) if stopped_id is not None else None


def write_shadow_outcomes(session: Session, version: str, outcomes: list[PhotoOutcome]) -> set[tuple[str, str]]:
    """Replaces ``version``'s tags on these photos and records them as processed by it, idempotently.

    Leaves photos.status, photos.model_version and processed_events alone: they belong to the active
    version. Writes nothing once ``version`` is no longer the running shadow, nor on deleted photos, photos
    the active path has not written, or photos that hold another upload than the event's (the live write
    refused an older event: its tags would describe a picture the photo no longer shows). Returns the
    (user_id, photo_id) written."""
    by_photo = {(o.event.user_id, o.event.photo_id): o for o in outcomes}  # a later event for a photo wins
    if not by_photo or not _shadow_runs(session, version):
        return set()
    # The users' album-summary locks first, in the order the live writer takes them (migration 0003), so
    # that a live batch and this one never wait on each other crosswise.
    session.execute(text("SELECT album_stats_lock_users(:users)"),
                    {"users": sorted({user_id for user_id, _ in by_photo})})
    rows = [(user_id, photo_id, o.event.uri, o.event.uploaded_at) for (user_id, photo_id), o in sorted(by_photo.items())]
    keys = [(r.user_id, r.photo_id) for r in session.execute(LOCK_SAME_UPLOADS, {"rows": _json_rows(rows)})]
    if not keys:
        return set()
    session.execute(
        delete(photo_tags).where(
            photo_tags.c.model_version == version,
            tuple_(photo_tags.c.user_id, photo_tags.c.photo_id).in_(keys),
        )
    )
    tag_rows = [
        {"user_id": user_id, "photo_id": photo_id, "model_version": version, "landmark_id": tag.landmark_id,
         "rank": rank, "score": float(tag.score), "method": str(tag.method)}
        for (user_id, photo_id) in keys
        for rank, tag in enumerate(by_photo[(user_id, photo_id)].tags)
    ]
    if tag_rows:
        session.execute(insert(photo_tags).values(tag_rows).on_conflict_do_nothing())
    seen = insert(shadow_photos).values(
        [{"user_id": user_id, "photo_id": photo_id, "model_version": version} for user_id, photo_id in keys]
    )
    session.execute(seen.on_conflict_do_update(index_elements=["user_id", "photo_id", "model_version"],
                                               set_={"processed_at": func.now()}))
    return set(keys)


def _shadow_runs(session: Session, version: str) -> bool:
    # FOR SHARE: `landmarks shadow stop` waits for the shadow writes in flight, and none commits after it.
    if session.scalar(
        select(shadow_rollouts.c.id)
        .where(shadow_rollouts.c.version == version, shadow_rollouts.c.stopped_at.is_(None))
        .with_for_update(read=True)
    ) is not None:
        return True
    # Promoted while its batch ran: the live write went to the version active before, so these verdicts
    # are the only ones the now active version has of the batch's photos (and its albums need them).
    return _holds_active(session, version)
