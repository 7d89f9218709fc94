"""The PostgreSQL contract against a real server: migrations, the idempotent tag writer, the album views."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, func, pool, select, text
from sqlalchemy.orm import Session

from shared import backfill
from shared.db import albums, migrate, writer
from shared.db.models import Base
from shared.db.session import make_engine, transaction
from shared.errors import InfrastructureError, Stage
from shared.events import GeoPoint, PhotoDeleted, PhotoUploaded
from shared.outcomes import Failure, GpsSource, Method, PhotoOutcome, PhotoStatus, Tag

pytestmark = pytest.mark.integration

SERVER = "postgresql+psycopg2://postgres@127.0.0.1:5432"
T0 = datetime(2024, 6, 1, 12, 0, tzinfo=UTC)
TABLES = ("landmarks", "model_versions", "photos", "photo_tags", "processed_events", "failures")
LANDMARKS = [
    {"id": 1, "name": "Eiffel Tower", "city": "Paris", "country": "France", "region": 1, "lat": 48.8584, "lon": 2.2945},
    {"id": 2, "name": "Louvre", "city": "Paris", "country": "France", "region": 1, "lat": 48.8606, "lon": 2.3376},
    {"id": 3, "name": "Colosseum", "city": "Rome", "country": "Italy", "region": 2, "lat": 41.8902, "lon": 12.4922},
    {"id": 4, "name": "Big Ben", "city": "London", "country": "United Kingdom", "region": 1, "lat": 51.5007, "lon": -0.1246},
]


def _reachable(host: str = "127.0.0.1", port: int = 5432) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def database_url():
    if not _reachable():
        pytest.skip("PostgreSQL is not reachable at 127.0.0.1:5432")
    name = f"lm_test_{secrets.token_hex(6)}"
    admin = create_engine(f"{SERVER}/postgres", isolation_level="AUTOCOMMIT", poolclass=pool.NullPool)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    try:
        yield f"{SERVER}/{name}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def engine(database_url):
    migrate.upgrade(database_url)
    engine = make_engine(database_url)
    yield engine
    engine.dispose()


@pytest.fixture
def session(engine):
    # Each test runs inside a transaction that is rolled back, as Warehouse's tests do.
    with engine.connect() as conn:
        outer = conn.begin()
        session = Session(bind=conn, join_transaction_mode="create_savepoint")
        try:
            yield session
        finally:
            session.close()
            outer.rollback()


@pytest.fixture
def world(session):
    writer.upsert_landmarks(session, LANDMARKS)
    writer.register_model_version(session, "v1", activate=True, **_model_args())
    return session


def _model_args(**overrides):
    args = dict(backbone="wrn50_2", embedding_dim=512, t_geo=0.5, t_global=0.7, t_ref=0.6, checkpoint="/m/v1.pt", metrics={"acc": 0.99})
    return {**args, **overrides}


def uploaded(photo: str, *, user: str = "alice", minutes: int = 0, event: str | None = None, gps=None) -> PhotoUploaded:
    return PhotoUploaded(
        event_id=event or f"up-{user}-{photo}",
        user_id=user,
        photo_id=photo,
        uri=f"file:///photos/{user}/{photo}.jpg",
        uploaded_at=T0 + timedelta(minutes=minutes),
        gps=gps,
    )


def tagged(photo: str, *tags: tuple[int, float], user: str = "alice", minutes: int = 0, event: str | None = None) -> PhotoOutcome:
    gps = GeoPoint(lat=48.858, lon=2.294)
    return PhotoOutcome(
        event=uploaded(photo, user=user, minutes=minutes, event=event, gps=gps),
        status=PhotoStatus.TAGGED,
        tags=[Tag(landmark_id=lm, score=score, method=Method.GEO) for lm, score in tags],
        gps=gps,
        gps_source=GpsSource.EVENT,
    )


def nothing(photo: str, *, user: str = "alice") -> PhotoOutcome:
    return PhotoOutcome(event=uploaded(photo, user=user), status=PhotoStatus.NO_LANDMARK)


def failed(photo: str, *, user: str = "alice", minutes: int = 0, event: str | None = None,
           failure: Failure = Failure(Stage.DECODE, "not an image")) -> PhotoOutcome:
    return PhotoOutcome(event=uploaded(photo, user=user, minutes=minutes, event=event), status=PhotoStatus.FAILED,
                        failure=failure)


def dump(session: Session) -> dict[str, list[tuple]]:
    return {
        t: [tuple(r) for r in session.execute(text(f"SELECT * FROM {t} ORDER BY 1, 2"))]
        for t in (*TABLES, "album_photos", "album_landmarks", "album_cities")
    }


def summary(session: Session, user: str = "alice") -> list[tuple]:
    return [
        (c.city, c.landmark_count, c.photo_count, [(lm.name, lm.photo_count, lm.cover_photo_id) for lm in c.landmarks])
        for c in albums.attractions(session, user)
    ]


BATCH = [
    tagged("p1", (1, 0.9), (2, 0.6), minutes=1),
    tagged("p2", (1, 0.8), minutes=2),
    tagged("p3", (3, 0.7), minutes=3),
    tagged("p4", (1, 0.9), minutes=4),  # ties p1 on score, newer: the cover
    nothing("p5"),
    failed("p6"),
]


def _head() -> str:
    return ScriptDirectory.from_config(migrate.config(SERVER)).get_current_head()


def test_migrations_round_trip(database_url, engine):
    head = _head()
    assert migrate.current(database_url) == head
    migrate.downgrade(database_url, "base")
    assert migrate.current(database_url) is None
    with engine.connect() as conn:
        left = conn.scalar(text("SELECT count(*) FROM pg_class WHERE relnamespace = 'public'::regnamespace AND relname NOT LIKE 'alembic_version%'"))
        functions = conn.scalar(text("SELECT count(*) FROM pg_proc WHERE pronamespace = 'public'::regnamespace"))
    assert left == 0 and functions == 0
    migrate.upgrade(database_url, "head")
    assert migrate.current(database_url) == head


def test_migration_matches_models(engine):
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []


def test_views_and_columns_are_documented(engine):
    with engine.connect() as conn:
        undocumented_views = conn.scalars(
            text("SELECT c.relname FROM pg_class c WHERE c.relkind = 'v' AND c.relnamespace = 'public'::regnamespace AND obj_description(c.oid, 'pg_class') IS NULL")
        ).all()
        undocumented_columns = conn.execute(
            text(
                "SELECT c.relname, a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
                "WHERE c.relkind = 'r' AND c.relnamespace = 'public'::regnamespace AND c.relname <> 'alembic_version' "
                "AND a.attnum > 0 AND NOT a.attisdropped AND col_description(c.oid, a.attnum) IS NULL"
            )
        ).all()
    assert undocumented_views == [] and undocumented_columns == []


def test_write_outcomes_fills_tables_and_views(world):
    assert writer.write_outcomes(world, "v1", BATCH) == 6

    statuses = dict(world.execute(text("SELECT photo_id, status FROM photos WHERE user_id = 'alice'")).all())
    assert statuses == {"p1": "tagged", "p2": "tagged", "p3": "tagged", "p4": "tagged", "p5": "no_landmark", "p6": "failed"}
    tags = world.execute(text("SELECT landmark_id, rank, method FROM photo_tags WHERE photo_id = 'p1' ORDER BY rank")).all()
    assert [tuple(t) for t in tags] == [(1, 0, "geo"), (2, 1, "geo")]
    failure = world.execute(text("SELECT event_key, stage, reason, payload->>'photo_id' FROM failures")).one()
    assert tuple(failure) == ("up-alice-p6", "decode", "not an image", "p6")
    assert world.scalar(text("SELECT count(*) FROM processed_events")) == 6

    assert summary(world) == [
        ("Paris", 2, 3, [("Eiffel Tower", 3, "p4"), ("Louvre", 1, "p1")]),
        ("Rome", 1, 1, [("Colosseum", 1, "p3")]),
    ]
    paris = albums.attractions(world, "alice")[0]
    assert paris.country == "France" and paris.latest_uploaded_at == T0 + timedelta(minutes=4)

    report = albums.photo_report(world, "alice", "p1")
    assert report["status"] == "tagged" and report["model_version"] == "v1" and report["failure"] is None
    assert [(t["landmark_id"], t["name"], t["city"], t["method"]) for t in report["tags"]] == [
        (1, "Eiffel Tower", "Paris", "geo"),
        (2, "Louvre", "Paris", "geo"),
    ]
    assert report["gps"] == {"lat": 48.858, "lon": 2.294, "source": "event"}
    failed_report = albums.photo_report(world, "alice", "p6")
    assert failed_report["failure"] == "not an image" and failed_report["tags"] == [] and failed_report["gps"] is None
    assert albums.photo_report(world, "alice", "missing") is None


def test_every_value_of_a_batch_arrives_exactly(world):
    """What the writer sends (one JSON parameter per statement) comes back as it was: an offset and
    microseconds, coordinates to the last bit, quotes, backslashes and non-ASCII in a URI, float32 scores."""
    at = datetime(2025, 3, 9, 23, 59, 58, 123456, tzinfo=timezone(timedelta(hours=5, minutes=30)))
    gps = GeoPoint(lat=48.858370123456789, lon=-2.2944813287654321)
    event = PhotoUploaded(event_id="exact-1", user_id="zoë", photo_id="p'1\\x", uploaded_at=at, gps=gps,
                          uri='file:///photos/zoë/"quoted" \\ back\\slash\u00e9.jpg')
    score = float(np.float32(0.87654321))
    outcome = PhotoOutcome(event=event, status=PhotoStatus.TAGGED, gps=gps, gps_source=GpsSource.EXIF,
                           tags=[Tag(landmark_id=1, score=score, method=Method.REFERENCE),
                                 Tag(landmark_id=2, score=0.5, method=Method.GEO)])
    assert writer.write_outcomes(world, "v1", [outcome]) == 1

    photo = world.execute(text("SELECT user_id, photo_id, uri, uploaded_at, gps_lat, gps_lon, gps_source, status "
                               "FROM photos WHERE photo_id = :p"), {"p": event.photo_id})
    assert photo.one() == ("zoë", event.photo_id, event.uri, at, gps.lat, gps.lon, "exif", "tagged")
    tags = world.execute(text("SELECT landmark_id, rank, score, method FROM photo_tags WHERE photo_id = :p ORDER BY rank"),
                         {"p": event.photo_id}).all()
    assert [tuple(t) for t in tags] == [(1, 0, pytest.approx(score, rel=1e-7), "reference"), (2, 1, 0.5, "geo")]
    claimed = world.execute(text("SELECT user_id, photo_id FROM processed_events WHERE event_id = 'exact-1'")).one()
    assert tuple(claimed) == ("zoë", event.photo_id)


def test_redelivery_changes_nothing(world):
    writer.write_outcomes(world, "v1", BATCH)
    before = dump(world)
    assert writer.write_outcomes(world, "v1", BATCH) == 0
    # Even a different decision for an already-applied event is ignored.
    assert writer.write_outcomes(world, "v1", [tagged("p1", (3, 0.99), minutes=1)]) == 0
    assert dump(world) == before


def test_duplicates_inside_one_batch(world):
    outcomes = [tagged("p1", (1, 0.9), (1, 0.5)), tagged("p1", (1, 0.9), (1, 0.5))]
    assert writer.write_outcomes(world, "v1", outcomes) == 1
    # A second event for the same photo in one batch: the later one wins.
    later = [tagged("p2", (1, 0.9), event="e-a"), tagged("p2", (3, 0.8), event="e-b")]
    assert writer.write_outcomes(world, "v1", later) == 1
    assert world.execute(text("SELECT landmark_id FROM photo_tags WHERE photo_id = 'p2'")).scalars().all() == [3]
    assert world.scalar(text("SELECT count(*) FROM processed_events WHERE event_id IN ('e-a', 'e-b')")) == 2


def test_an_older_upload_of_a_photo_never_replaces_a_newer_one(world):
    """The user re-uploaded (edited) the photo; the first upload's event comes last: a backfill event queued
    before the re-upload, or one handed back during an outage."""
    writer.write_outcomes(world, "v1", [tagged("p1", (3, 0.8), minutes=5, event="re-upload")])
    newer = dump(world)["photos"]
    assert writer.write_outcomes(world, "v1", [tagged("p1", (1, 0.9), minutes=1, event="first-upload")]) == 0
    assert dump(world)["photos"] == newer
    assert world.execute(text("SELECT landmark_id FROM photo_tags WHERE photo_id = 'p1'")).scalars().all() == [3]
    assert world.scalar(text("SELECT count(*) FROM processed_events WHERE event_id = 'first-upload'")) == 1
    # Both in one batch, the older last: the newer upload still wins.
    both = [tagged("p2", (3, 0.8), minutes=5, event="p2-new"), tagged("p2", (1, 0.9), minutes=1, event="p2-old")]
    assert writer.write_outcomes(world, "v1", both) == 1
    assert world.execute(text("SELECT landmark_id FROM photo_tags WHERE photo_id = 'p2'")).scalars().all() == [3]


def test_a_failed_retry_of_the_same_upload_keeps_its_verdict_and_is_recorded(world):
    """A backfill (or a re-run) during a storage outage: the photo must not leave the album for a fetch that
    failed, while a new upload of the photo that fails does replace the old verdict."""
    writer.write_outcomes(world, "v1", [tagged("p1", (3, 0.8), minutes=1, event="first")])
    before = dump(world)
    outage = Failure(Stage.FETCH, "HTTP 503 Service Unavailable")
    assert writer.write_outcomes(world, "v1", [failed("p1", minutes=1, event="retry", failure=outage)]) == 0
    after = dump(world)
    assert after["photos"] == before["photos"] and after["photo_tags"] == before["photo_tags"]
    assert world.execute(text("SELECT stage, reason FROM failures WHERE event_key = 'retry'")).all() == \
        [("fetch", "HTTP 503 Service Unavailable")]
    assert writer.write_outcomes(world, "v1", [failed("p1", minutes=2, event="re-upload")]) == 1
    assert world.scalar(text("SELECT status FROM photos WHERE photo_id = 'p1'")) == "failed"
    assert world.scalar(text("SELECT count(*) FROM photo_tags WHERE photo_id = 'p1'")) == 0


def test_a_failed_retry_in_the_same_batch_as_the_verdict_keeps_it_as_in_the_next_batch(world):
    """A live event and a backfill's event of the same upload, one tagged, the other failing its fetch: the
    photo must not end up failed (out of its album) only because both came in one batch."""
    outage = Failure(Stage.FETCH, "HTTP 503 Service Unavailable")
    writer.write_outcomes(world, "v1", [tagged("p1", (3, 0.8), event="p1-live"),
                                        failed("p1", event="p1-backfill", failure=outage)])
    writer.write_outcomes(world, "v1", [tagged("p2", (3, 0.8), event="p2-live")])
    writer.write_outcomes(world, "v1", [failed("p2", event="p2-backfill", failure=outage)])
    photo = text("SELECT status, model_version FROM photos WHERE photo_id = :p")
    tags = text("SELECT landmark_id, rank, score FROM photo_tags WHERE photo_id = :p")
    assert world.execute(photo, {"p": "p1"}).all() == world.execute(photo, {"p": "p2"}).all() == [("tagged", "v1")]
    assert world.execute(tags, {"p": "p1"}).all() == world.execute(tags, {"p": "p2"}).all() != []
    assert world.execute(text("SELECT event_key FROM failures ORDER BY 1")).scalars().all() == \
        ["p1-backfill", "p2-backfill"]


def test_a_failed_upload_superseded_in_its_own_batch_is_still_recorded(world):
    """Whether the later upload came in the same batch or the next must not decide whether the failure of
    the earlier one is on record."""
    batch = [failed("p1", minutes=1, event="broken-first"), tagged("p1", (1, 0.9), minutes=2, event="fixed")]
    assert writer.write_outcomes(world, "v1", batch) == 1
    assert world.execute(text("SELECT event_key, stage FROM failures")).all() == [("broken-first", "decode")]
    assert world.scalar(text("SELECT status FROM photos WHERE photo_id = 'p1'")) == "tagged"


def test_a_photo_report_leaves_out_the_failure_of_an_upload_the_photo_no_longer_holds(world):
    """A corrupt upload, then a good one of the same photo (a later batch, or the same one): the tagged photo
    must not read as if its upload had failed."""
    writer.write_outcomes(world, "v1", [failed("p1", minutes=1, event="broken")])
    assert albums.photo_report(world, "alice", "p1")["failure"] == "not an image"
    writer.write_outcomes(world, "v1", [tagged("p1", (1, 0.9), minutes=2, event="fixed")])
    report = albums.photo_report(world, "alice", "p1")
    assert (report["status"], report["failure"], report["tags"][0]["landmark_id"]) == ("tagged", None, 1)

    writer.write_outcomes(world, "v1", [failed("p2", minutes=1, event="p2-broken"),
                                        tagged("p2", (3, 0.8), minutes=2, event="p2-fixed")])
    same_batch = albums.photo_report(world, "alice", "p2")
    assert (same_batch["status"], same_batch["failure"]) == ("tagged", None)


def _photo_command(database_url: str, user: str, photo_id: str) -> dict:
    """`landmarks photo PHOTO --user USER --json`, as support runs it (no broker or Milvus needed)."""
    env = {**os.environ, "LANDMARKS_DATABASE_URL": database_url,
           "LANDMARKS_BROKER_URL": "redis://127.0.0.1:1/0", "LANDMARKS_MILVUS_URI": "http://127.0.0.1:1"}
    done = subprocess.run([sys.executable, "-m", "shared.cli", "photo", photo_id, "--user", user, "--json"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_photo_command_reports_dead_letters_and_the_failures_of_the_upload_a_photo_holds(database_url, engine):
    """Each write its own transaction, as the workers' are: a malformed upload reads as failed, not pending; a
    re-upload hides the failure of the corrupt one it replaced; a failed retry of the upload it holds shows."""
    malformed = {"event_id": "m1", "user_id": "alice", "photo_id": "pm", "uploaded_at": "yesterday"}
    try:
        with transaction(engine) as s:
            writer.upsert_landmarks(s, LANDMARKS)
            writer.register_model_version(s, "vp", activate=True, **_model_args())
            writer.record_failure(s, payload=malformed, task="landmarks.photo_uploaded", stage=Stage.VALIDATE,
                                  reason="malformed event: uploaded_at")
            writer.write_outcomes(s, "vp", [failed("pb", minutes=1, event="b1",
                                                   failure=Failure(Stage.DECODE, "corrupt image: truncated"))])
        with transaction(engine) as s:
            writer.write_outcomes(s, "vp", [tagged("pb", (1, 0.9), minutes=2, event="b2")])
        dead_letter, re_uploaded = (_photo_command(database_url, "alice", p) for p in ("pm", "pb"))
        assert (dead_letter["status"], dead_letter["failure"]) == ("failed", "malformed event: uploaded_at")
        assert (re_uploaded["status"], re_uploaded["failure"]) == ("tagged", None)

        outage = Failure(Stage.FETCH, "HTTP 503 Service Unavailable")
        with transaction(engine) as s:  # a backfill of the upload the photo holds: it keeps its tags
            writer.write_outcomes(s, "vp", [failed("pb", minutes=2, event="b2-retry", failure=outage)])
        retried = _photo_command(database_url, "alice", "pb")
        assert (retried["status"], retried["failure"]) == ("tagged", "HTTP 503 Service Unavailable")
        assert [t["landmark_id"] for t in retried["tags"]] == [1]
    finally:
        _truncate(engine)


def test_a_re_upload_drops_every_versions_tags_of_the_old_picture(world):
    """v1 saw the Eiffel Tower in p1; the user replaced the picture while v2 was active, and v2 saw no landmark
    in the new one. A rollback to v1 must not put the new picture in the Eiffel Tower album."""
    writer.register_model_version(world, "v2", **_model_args(checkpoint="/m/v2.pt"))
    writer.write_outcomes(world, "v1", [tagged("p1", (1, 0.9), minutes=1, event="first"),
                                        tagged("p2", (1, 0.8), minutes=1, event="other")])
    writer.start_shadow_rollout(world, "v2", 1.0, "test")
    writer.write_shadow_outcomes(world, "v2", [tagged("p1", (1, 0.9), minutes=1, event="first")])
    writer.stop_shadow_rollout(world)
    writer.activate_model_version(world, "v2")
    replaced = PhotoOutcome(event=uploaded("p1", minutes=5, event="re-upload"), status=PhotoStatus.NO_LANDMARK)
    assert writer.write_outcomes(world, "v2", [replaced]) == 1
    assert world.scalar(text("SELECT count(*) FROM photo_tags WHERE photo_id = 'p1'")) == 0
    assert world.scalar(text("SELECT count(*) FROM shadow_photos WHERE photo_id = 'p1'")) == 0
    writer.activate_model_version(world, "v1")  # the rollback
    assert summary(world) == [("Paris", 1, 1, [("Eiffel Tower", 1, "p2")])]
    # The same upload seen again by another version keeps the first version's tags.
    writer.write_outcomes(world, "v2", [tagged("p2", (3, 0.7), minutes=1, event="other-v2")])
    assert world.execute(text("SELECT model_version FROM photo_tags WHERE photo_id = 'p2' ORDER BY 1")).scalars().all() \
        == ["v1", "v2"]


def test_a_shadow_verdict_on_an_upload_the_photo_no_longer_holds_is_not_written(world):
    """A backfill or handed-back event of the old picture arrives after the re-upload: the live write refuses
    it, and the shadow must not tag the photo with what the old picture showed."""
    writer.register_model_version(world, "v2", **_model_args(checkpoint="/m/v2.pt"))
    writer.write_outcomes(world, "v1", [tagged("s1", (3, 0.8), minutes=5, event="new")])
    writer.start_shadow_rollout(world, "v2", 1.0, "test")
    late = tagged("s1", (1, 0.9), minutes=1, event="old")
    assert writer.write_outcomes(world, "v1", [late]) == 0
    assert writer.write_shadow_outcomes(world, "v2", [late]) == set()
    assert writer.write_shadow_outcomes(world, "v2", [tagged("s1", (3, 0.8), minutes=5, event="new")]) == {("alice", "s1")}
    assert world.execute(text("SELECT model_version, landmark_id FROM photo_tags ORDER BY 1")).all() == \
        [("v1", 3), ("v2", 3)]


def test_a_batch_whose_version_was_promoted_away_before_it_wrote_is_retried(world):
    """A worker read v1 as active, then v2 was promoted before its batch wrote: under v1 its photo would be in
    no album. The live write is refused, and the batch goes round again under v2."""
    writer.register_model_version(world, "v2", **_model_args(checkpoint="/m/v2.pt"))
    writer.activate_model_version(world, "v2")
    batch = [tagged("r1", (1, 0.9), minutes=1, event="in-flight")]
    with pytest.raises(InfrastructureError, match="not the active version in PostgreSQL"):
        writer.write_live_outcomes(world, "v1", batch)
    assert writer.write_live_outcomes(world, "v2", batch) == 1  # the retry, under the active version
    assert summary(world) == [("Paris", 1, 1, [("Eiffel Tower", 1, "r1")])]


def test_a_shadow_verdict_written_after_its_version_was_promoted_counts_as_the_active_ones(world):
    """The batch's live write (v1) committed, then v2, its shadow on every photo, was promoted, which ends the
    shadow: its verdict on the batch is the only one v2 has of the photo, and v2's albums need it."""
    writer.register_model_version(world, "v2", **_model_args(checkpoint="/m/v2.pt"))
    writer.start_shadow_rollout(world, "v2", 1.0, "test")
    batch = [tagged("r2", (1, 0.9), minutes=1, event="live-then-promoted")]
    assert writer.write_live_outcomes(world, "v1", batch) == 1
    writer.activate_model_version(world, "v2")
    writer.stop_shadow_rollout(world, reason="promoted", version="v2")
    assert writer.write_shadow_outcomes(world, "v2", batch) == {("alice", "r2")}
    assert summary(world) == [("Paris", 1, 1, [("Eiffel Tower", 1, "r2")])]


def test_a_deleted_photo_leaves_no_shadow_verdict_to_count(world):
    writer.register_model_version(world, "v2", **_model_args(checkpoint="/m/v2.pt"))
    writer.write_outcomes(world, "v1", [tagged("d1", (1, 0.9), minutes=1, event="up-d1")])
    writer.start_shadow_rollout(world, "v2", 1.0, "test")
    writer.write_shadow_outcomes(world, "v2", [tagged("d1", (1, 0.9), minutes=1, event="up-d1")])
    writer.delete_photo(world, PhotoDeleted(event_id="del-d1", user_id="alice", photo_id="d1"))
    assert world.scalar(text("SELECT count(*) FROM shadow_photos WHERE photo_id = 'd1'")) == 0


def test_a_shadow_verdict_on_an_event_without_a_utc_offset_is_written(world):
    """The upload pipeline may send uploaded_at without an offset: stored as PostgreSQL reads it, the same
    upload must still be recognised as the same for the shadow."""
    writer.register_model_version(world, "v2", **_model_args(checkpoint="/m/v2.pt"))
    naive = tagged("n1", (3, 0.8), minutes=5, event="naive")
    naive.event = naive.event.model_copy(update={"uploaded_at": naive.event.uploaded_at.replace(tzinfo=None)})
    writer.write_outcomes(world, "v1", [naive])
    writer.start_shadow_rollout(world, "v2", 1.0, "test")
    assert writer.write_shadow_outcomes(world, "v2", [naive]) == {("alice", "n1")}


def test_an_upload_committed_while_a_batch_waits_for_the_row_is_still_seen_as_replaced(engine):
    """Batch A's statement starts, then waits for alice, whom another transaction holds; meanwhile batch B
    writes the first upload of bob's photo in A's batch, with a tag. A replaces B's upload: B's tags of the
    old picture must go, although A's statement began before B's upload existed."""
    import threading

    with transaction(engine) as s:
        writer.upsert_landmarks(s, LANDMARKS)
        writer.register_model_version(s, "vr", activate=True, **_model_args())
        writer.register_model_version(s, "vs", **_model_args(checkpoint="/m/vs.pt"))
        writer.write_outcomes(s, "vr", [tagged("a", (1, 0.9), minutes=1, event="r-a1")])
    holder = Session(bind=engine)
    done: list[int] = []
    try:
        holder.execute(text("UPDATE photos SET processed_at = now() WHERE photo_id = 'a'"))  # holds row a

        def batch_a() -> None:
            with transaction(engine) as s:
                done.append(writer.write_outcomes(s, "vr", [tagged("a", (1, 0.9), minutes=4, event="r-a4"),
                                                            tagged("b", user="bob", minutes=4, event="r-b4")]))

        waiting = threading.Thread(target=batch_a)
        waiting.start()
        waiting.join(0.5)
        assert waiting.is_alive(), "batch A did not wait for alice"
        with transaction(engine) as s:  # batch B, under another version: the old picture, tagged
            writer.write_outcomes(s, "vs", [tagged("b", (3, 0.8), user="bob", minutes=1, event="s-b1")])
        holder.commit()
        waiting.join(10)
        assert done == [2]
        with transaction(engine) as s:
            assert s.execute(text("SELECT uploaded_at, upload_replaced FROM photos WHERE photo_id = 'b'")).one() == \
                (T0 + timedelta(minutes=4), True)
            assert s.scalar(text("SELECT count(*) FROM photo_tags WHERE photo_id = 'b'")) == 0
    finally:
        holder.close()
        _truncate(engine)


def test_reprocessing_replaces_tags_of_that_version(world):
    writer.write_outcomes(world, "v1", [tagged("p1", (1, 0.9), (2, 0.6), event="first")])
    writer.write_outcomes(world, "v1", [tagged("p1", (3, 0.7), event="second")])
    assert world.execute(text("SELECT landmark_id, rank FROM photo_tags")).all() == [(3, 0)]
    writer.write_outcomes(world, "v1", [PhotoOutcome(event=uploaded("p1", event="third"), status=PhotoStatus.NO_LANDMARK)])
    assert world.scalar(text("SELECT count(*) FROM photo_tags")) == 0
    assert albums.attractions(world, "alice") == []


def test_delete_removes_tags_and_resists_resurrection(world):
    writer.write_outcomes(world, "v1", BATCH)
    event = PhotoDeleted(event_id="del-p4", user_id="alice", photo_id="p4")
    assert writer.delete_photo(world, event) is True
    assert writer.delete_photo(world, event) is False

    row = world.execute(text("SELECT status, deleted_at IS NOT NULL, gps_lat FROM photos WHERE photo_id = 'p4'")).one()
    assert tuple(row) == ("deleted", True, None)
    assert world.scalar(text("SELECT count(*) FROM photo_tags WHERE photo_id = 'p4'")) == 0
    assert summary(world)[0] == ("Paris", 2, 2, [("Eiffel Tower", 2, "p1"), ("Louvre", 1, "p1")])

    before = dump(world)
    # The upload redelivered after the deletion (under a new event id, as a retry might) changes nothing.
    assert writer.write_outcomes(world, "v1", [tagged("p4", (1, 0.99), minutes=4, event="late-upload")]) == 0
    after = dump(world)
    assert [r for r in after["processed_events"] if r[0] == "late-upload"]
    after["processed_events"] = [r for r in after["processed_events"] if r[0] != "late-upload"]
    assert after == before


def test_a_deleted_photo_keeps_no_location_in_its_failures(world):
    where = GeoPoint(lat=48.8584, lon=2.2945)
    fail = PhotoOutcome(event=uploaded("p7", event="gps-fail", gps=where), status=PhotoStatus.FAILED,
                        failure=Failure(Stage.DECODE, "not an image"))
    writer.write_outcomes(world, "v1", [fail])
    long_one = {"event_id": "too-long", "user_id": "alice", "photo_id": "p7", "gps": {"lat": 48.8584, "lon": 2.2945},
                "pad": "x" * 20_000}
    writer.record_failure(world, payload=long_one, task="landmarks.photo_uploaded", stage=Stage.VALIDATE, reason="r")
    other = uploaded("p8", event="other-photo", gps=where)
    writer.write_outcomes(world, "v1", [PhotoOutcome(event=other, status=PhotoStatus.FAILED,
                                                     failure=Failure(Stage.DECODE, "not an image"))])
    assert "48.8584" in str(world.scalar(text("SELECT payload FROM failures WHERE event_key = 'too-long'")))

    writer.delete_photo(world, PhotoDeleted(event_id="del-p7", user_id="alice", photo_id="p7"))
    payloads = dict(world.execute(text("SELECT event_key, payload FROM failures")).all())
    assert "48.8584" not in str(payloads["gps-fail"]) and payloads["gps-fail"]["photo_id"] == "p7"
    assert "48.8584" not in str(payloads["too-long"])
    assert payloads["other-photo"]["gps"] == {"lat": 48.8584, "lon": 2.2945}  # another photo's: kept

    # An upload of the deleted photo that fails afterwards (its file is gone): recorded, without its location.
    late = PhotoOutcome(event=uploaded("p7", minutes=5, event="after-delete", gps=where), status=PhotoStatus.FAILED,
                        failure=Failure(Stage.FETCH, "file not found"))
    writer.write_outcomes(world, "v1", [late])
    writer.record_failure(world, payload={**long_one, "event_id": "bad-after-delete"},
                          task="landmarks.photo_uploaded", stage=Stage.VALIDATE, reason="r")
    payloads = dict(world.execute(text("SELECT event_key, payload FROM failures")).all())
    assert payloads["after-delete"]["photo_id"] == "p7" and "48.8584" not in str(payloads["after-delete"])
    assert "48.8584" not in str(payloads["bad-after-delete"])


def test_delete_before_upload_leaves_a_tombstone(world):
    assert writer.delete_photo(world, PhotoDeleted(event_id="del-early", user_id="alice", photo_id="px")) is True
    row = world.execute(text("SELECT status, uri, uploaded_at FROM photos WHERE photo_id = 'px'")).one()
    assert tuple(row) == ("deleted", None, None)
    assert writer.write_outcomes(world, "v1", [tagged("px", (1, 0.9))]) == 0
    assert world.scalar(text("SELECT count(*) FROM photo_tags")) == 0
    assert albums.photo_report(world, "alice", "px")["status"] == "deleted"


def test_record_failure_is_idempotent(world):
    payload = {"event_id": "bad-1", "user_id": "alice", "photo_id": "p9", "uploaded_at": "yesterday"}
    for _ in range(2):
        writer.record_failure(world, payload=payload, task="landmarks.photo_uploaded", stage=Stage.VALIDATE, reason="malformed event: uploaded_at")
    rows = world.execute(text("SELECT event_key, event_id, user_id, photo_id, stage, payload FROM failures")).all()
    assert [tuple(r) for r in rows] == [("bad-1", "bad-1", "alice", "p9", "validate", payload)]
    # No photos row, yet it will never be processed: failed with its reason, not a queued upload.
    report = albums.photo_report(world, "alice", "p9")
    assert (report["status"], report["failure"], report["tags"]) == ("failed", "malformed event: uploaded_at", [])

    # Payloads without an event id, hostile or huge, are keyed by hash and bounded.
    for junk in (b"\x00not json", ["a", "list"], {"event_id": 5, "x": "\x00" * 10}, {"blob": "x" * 100_000}):
        writer.record_failure(world, payload=junk, task="landmarks.photo_uploaded", stage="validate", reason="malformed\x00")
        writer.record_failure(world, payload=junk, task="landmarks.photo_uploaded", stage="validate", reason="malformed\x00")
    assert world.scalar(text("SELECT count(*) FROM failures")) == 5
    assert world.scalar(text("SELECT count(*) FROM failures WHERE event_key LIKE 'sha256:%'")) == 4
    assert world.scalar(text("SELECT max(length(payload::text)) FROM failures")) < 9 * 1024
    assert world.scalar(text("SELECT count(*) FROM failures WHERE payload ? 'truncated'")) == 1


def test_a_failure_keeps_its_photos_address_but_not_the_credentials_in_it(world):
    """Support reads `failures` for as long as it keeps the rows: a presigned URL's signature or a password
    kept there would let anyone who reads the table fetch the photo."""
    signed = ("https://photos.example/alice/p5.jpg?X-Amz-Credential=AKIA%2F20261207&X-Amz-Expires=3600"
              "&X-Amz-Signature=0f9e8d7c6b5a")
    event = uploaded("p5", event="signed-fetch").model_copy(update={
        "uri": signed, "preview_uri": "https://bob:hunter2@previews.example/alice/p5.jpg"})
    writer.write_outcomes(world, "v1", [PhotoOutcome(event=event, status=PhotoStatus.FAILED,
                                                     failure=Failure(Stage.FETCH, "HTTP 403"))])
    malformed = {"event_id": "bad-signed", "user_id": "alice", "photo_id": "p6", "uri": signed, "uploaded_at": "?"}
    writer.record_failure(world, payload=malformed, task="landmarks.photo_uploaded", stage=Stage.VALIDATE, reason="r")
    payloads = dict(world.execute(text("SELECT event_key, payload FROM failures")).all())
    for key in ("signed-fetch", "bad-signed"):
        assert payloads[key]["uri"] == ("https://photos.example/alice/p5.jpg?X-Amz-Credential=***&X-Amz-Expires=***"
                                        "&X-Amz-Signature=***")
        assert "0f9e8d7c6b5a" not in json.dumps(payloads[key]) and "AKIA" not in json.dumps(payloads[key])
    assert payloads["signed-fetch"]["preview_uri"] == "https://***@previews.example/alice/p5.jpg"
    assert payloads["signed-fetch"]["photo_id"] == "p5" and payloads["bad-signed"]["uploaded_at"] == "?"
    assert world.scalar(text("SELECT uri FROM photos WHERE photo_id = 'p5'")) == signed  # what backfill fetches


def _nested(depth: int) -> list:
    value: list = []
    for _ in range(depth - 1):
        value = [value]
    return value


def test_a_failure_with_lone_surrogates_is_recorded_readably(world):
    # The broker's json.loads keeps an escaped lone surrogate; psycopg2 cannot encode it, jsonb refuses it.
    payload = {"event_id": "sur\ud800", "user_id": "al\udfffice", "photo_id": "p\ud83d", "note\udce9": ["caf\udce9"]}
    writer.record_failure(world, payload=payload, task="landmarks.photo_uploaded", stage="validate",
                          reason="malformed event: event_id: unable to parse raw data as a unicode string")
    row = world.execute(text("SELECT event_key, event_id, user_id, photo_id, payload FROM failures")).one()
    assert tuple(row) == ("sur\ufffd", "sur\ufffd", "al\ufffdice", "p\ufffd",
                          {"event_id": "sur\ufffd", "user_id": "al\ufffdice", "photo_id": "p\ufffd",
                           "note\ufffd": ["caf\ufffd"]})


def test_a_failure_nested_deeper_than_json_walks_is_recorded(world):
    # orjson, the broker's decoder, reads 1,024 levels; json.dumps and repr() give up at the recursion limit
    # (1,000, unless something loaded earlier in the run raised it: torch.compile does).
    depth = sys.getrecursionlimit() + 50
    deep = {"event_id": "deep-1", "user_id": "alice", "x": _nested(depth)}
    orphans = [{"user_id": "alice", "x": _nested(depth)}, {"user_id": "bob", "x": _nested(depth)}]
    nan = {"event_id": "nan-1", "gps": {"lat": float("nan"), "lon": 2.0}}
    for payload in (deep, *orphans, orphans[0], nan):
        writer.record_failure(world, payload=payload, task="landmarks.photo_uploaded", stage="validate", reason="r")
    rows = dict(world.execute(text("SELECT event_key, payload FROM failures")).all())
    assert rows["deep-1"]["unserialisable"].startswith("{'event_id': 'deep-1', 'user_id': 'alice', 'x': [[[[")
    assert len(rows["deep-1"]["unserialisable"]) < 1024
    assert rows["nan-1"] == {"unserialisable": "{'event_id': 'nan-1', 'gps': {'lat': nan, 'lon': 2.0}}"}
    assert sum(key.startswith("sha256:") for key in rows) == 2  # each orphan once, under a key of its own


def test_only_the_active_version_is_visible(world):
    writer.register_model_version(world, "v2", **_model_args(checkpoint="/m/v2.pt"))
    assert writer.active_model_version(world).version == "v1"
    writer.write_outcomes(world, "v1", [tagged("p1", (1, 0.9), event="a1"), tagged("p2", (1, 0.8), event="a2")])
    writer.write_outcomes(world, "v2", [tagged("p1", (3, 0.9), event="b1"), tagged("p2", (3, 0.8), event="b2"), tagged("p3", (4, 0.7), event="b3")])
    assert world.scalar(text("SELECT count(*) FROM photo_tags")) == 5

    assert summary(world) == [("Paris", 1, 2, [("Eiffel Tower", 2, "p1")])]
    writer.activate_model_version(world, "v2")
    assert writer.active_model_version(world).version == "v2"
    assert world.scalar(text("SELECT count(*) FROM model_versions WHERE is_active")) == 1
    assert summary(world) == [("Rome", 1, 2, [("Colosseum", 2, "p1")]), ("London", 1, 1, [("Big Ben", 1, "p3")])]

    writer.register_model_version(world, "v1", activate=True, **_model_args(metrics={"acc": 0.98}))
    assert writer.active_model_version(world).metrics == {"acc": 0.98}
    assert summary(world) == [("Paris", 1, 2, [("Eiffel Tower", 2, "p1")])]
    with pytest.raises(LookupError):
        writer.activate_model_version(world, "nope")


def test_no_active_version_shows_nothing(session):
    writer.upsert_landmarks(session, LANDMARKS)
    writer.register_model_version(session, "v0", **_model_args())
    assert writer.active_model_version(session) is None
    writer.write_outcomes(session, "v0", [tagged("p1", (1, 0.9))])
    assert albums.attractions(session, "alice") == []


def test_landmark_photos_keyset_pagination(world):
    # 23 photos with repeated upload times, so photo_id must break ties.
    outcomes = [tagged(f"p{i:02d}", (1, 0.5 + i / 100), minutes=i // 3) for i in range(23)]
    writer.write_outcomes(world, "v1", outcomes)
    seen, after = [], None
    while page := albums.landmark_photos(world, "alice", 1, limit=5, after=after):
        seen.extend(page)
        after = page[-1].cursor
    assert len(seen) == 23 and len({p.photo_id for p in seen}) == 23
    keys = [(p.uploaded_at, p.photo_id) for p in seen]
    assert keys == sorted(keys, reverse=True)
    assert seen[0].uri == "file:///photos/alice/p22.jpg" and seen[0].method == "geo" and seen[0].rank == 0
    assert albums.landmark_photos(world, "alice", 3) == []


def test_users_never_see_each_other(world):
    writer.write_outcomes(world, "v1", [tagged("p1", (1, 0.9)), tagged("p1", (3, 0.9), user="bob"), tagged("p2", (1, 0.8), user="bob")])
    assert summary(world, "alice") == [("Paris", 1, 1, [("Eiffel Tower", 1, "p1")])]
    assert summary(world, "bob") == [("Paris", 1, 1, [("Eiffel Tower", 1, "p2")]), ("Rome", 1, 1, [("Colosseum", 1, "p1")])]
    assert [p.photo_id for p in albums.landmark_photos(world, "alice", 1)] == ["p1"]
    assert albums.landmark_photos(world, "alice", 3) == []
    assert albums.photo_report(world, "bob", "p1")["tags"][0]["landmark_id"] == 3
    assert albums.attractions(world, "carol") == []
    # Deleting bob's p1 leaves alice's p1 alone.
    writer.delete_photo(world, PhotoDeleted(event_id="d", user_id="bob", photo_id="p1"))
    assert summary(world, "alice") == [("Paris", 1, 1, [("Eiffel Tower", 1, "p1")])]


def test_transaction_commits_rolls_back_and_wraps_outages(engine):
    with pytest.raises(RuntimeError):
        with transaction(engine) as s:
            writer.upsert_landmarks(s, LANDMARKS[:1])
            raise RuntimeError("boom")
    with transaction(engine) as s:
        assert s.scalar(text("SELECT count(*) FROM landmarks")) == 0
        writer.upsert_landmarks(s, [{**LANDMARKS[0], "id": 999}])
    try:
        with transaction(engine) as s:
            assert s.scalar(text("SELECT name FROM landmarks WHERE id = 999")) == "Eiffel Tower"
    finally:
        with transaction(engine) as s:
            s.execute(text("DELETE FROM landmarks WHERE id = 999"))

    dead = make_engine("postgresql+psycopg2://postgres@127.0.0.1:1/none", connect_args={"connect_timeout": 2})
    with pytest.raises(InfrastructureError):
        with transaction(dead) as s:
            s.execute(text("SELECT 1"))
    with pytest.raises(InfrastructureError):
        migrate.current("postgresql+psycopg2://postgres@127.0.0.1:1/none")


def test_concurrent_redelivery_applies_once(engine):
    import threading

    batch = [tagged("c1", (1, 0.9), event="c-1"), tagged("c2", (3, 0.8), event="c-2")]
    results: list[int] = []
    try:
        with transaction(engine) as s:
            writer.upsert_landmarks(s, LANDMARKS)
            writer.register_model_version(s, "vc", activate=True, **_model_args())
        first = Session(bind=engine)
        assert writer.write_outcomes(first, "vc", batch) == 2

        def redeliver():
            with transaction(engine) as s:
                results.append(writer.write_outcomes(s, "vc", batch))

        # The second delivery waits on the first's claim of the event ids, then sees them applied.
        worker = threading.Thread(target=redeliver)
        worker.start()
        worker.join(0.5)
        assert worker.is_alive()
        first.commit()
        first.close()
        worker.join(10)
        assert results == [0]
        with transaction(engine) as s:
            assert s.scalar(text("SELECT count(*) FROM photo_tags")) == 2
    finally:
        with transaction(engine) as s:
            s.execute(text(f"TRUNCATE {', '.join(TABLES)} CASCADE"))


# --- album summaries (migration 0003): the views must equal the aggregates they replaced -----------

# album_landmarks and album_cities as defined before 0003: aggregates over album_photos at read time.
AGGREGATED_LANDMARKS = """
SELECT a.user_id, a.landmark_id, l.name, l.city, l.country, count(*) AS photo_count,
       (array_agg(a.photo_id ORDER BY a.score DESC, a.uploaded_at DESC NULLS LAST, a.photo_id DESC))[1],
       max(a.uploaded_at)
FROM album_photos a JOIN landmarks l ON l.id = a.landmark_id
GROUP BY a.user_id, a.landmark_id, l.name, l.city, l.country
"""
AGGREGATED_CITIES = """
SELECT a.user_id, l.country, l.city, count(DISTINCT a.landmark_id), count(DISTINCT a.photo_id), max(a.uploaded_at)
FROM album_photos a JOIN landmarks l ON l.id = a.landmark_id
GROUP BY a.user_id, l.country, l.city
"""


def assert_albums_match_tags(session: Session) -> None:
    def rows(sql: str) -> list[tuple]:
        return [tuple(r) for r in session.execute(text(f"SELECT * FROM ({sql}) v ORDER BY 1, 2, 3"))]

    assert rows("SELECT * FROM album_landmarks") == rows(AGGREGATED_LANDMARKS)
    assert rows("SELECT * FROM album_cities") == rows(AGGREGATED_CITIES)
    # Every version's summary, not only the active one's, so that activating another is instant.
    for version in session.scalars(text("SELECT version FROM model_versions")).all():
        with _active(session, version):
            assert rows("SELECT * FROM album_landmarks") == rows(AGGREGATED_LANDMARKS)
            assert rows("SELECT * FROM album_cities") == rows(AGGREGATED_CITIES)


@contextmanager
def _active(session: Session, version: str):
    savepoint = session.begin_nested()  # rolled back: the activation is only for the block
    try:
        session.execute(text("UPDATE model_versions SET is_active = false WHERE is_active"))
        session.execute(text("UPDATE model_versions SET is_active = true WHERE version = :v"), {"v": version})
        yield
    finally:
        savepoint.rollback()


def test_album_summaries_follow_writes(world):
    writer.write_outcomes(world, "v1", BATCH)
    assert_albums_match_tags(world)
    # A photo of two landmarks of one city counts once in the city.
    writer.write_outcomes(world, "v1", [tagged("p7", (1, 0.5), (2, 0.95), minutes=7)])
    assert summary(world)[0] == ("Paris", 2, 4, [("Eiffel Tower", 4, "p4"), ("Louvre", 2, "p7")])
    assert_albums_match_tags(world)
    # Re-processing moves p7 out of Paris; the Louvre's cover goes back to p1.
    writer.write_outcomes(world, "v1", [tagged("p7", (3, 0.99), minutes=7, event="again")])
    assert summary(world) == [
        ("Paris", 2, 3, [("Eiffel Tower", 3, "p4"), ("Louvre", 1, "p1")]),
        ("Rome", 1, 2, [("Colosseum", 2, "p7")]),
    ]
    assert_albums_match_tags(world)
    # The cover is deleted: the next best photo becomes the cover; the emptied album disappears.
    writer.delete_photo(world, PhotoDeleted(event_id="d4", user_id="alice", photo_id="p4"))
    writer.delete_photo(world, PhotoDeleted(event_id="d1", user_id="alice", photo_id="p1"))
    assert summary(world) == [("Paris", 1, 1, [("Eiffel Tower", 1, "p2")]), ("Rome", 1, 2, [("Colosseum", 2, "p7")])]
    assert_albums_match_tags(world)
    no_landmark = PhotoOutcome(event=uploaded("p7", minutes=7, event="third"), status=PhotoStatus.NO_LANDMARK)
    writer.write_outcomes(world, "v1", [no_landmark])
    assert summary(world) == [("Paris", 1, 1, [("Eiffel Tower", 1, "p2")]), ("Rome", 1, 1, [("Colosseum", 1, "p3")])]
    assert_albums_match_tags(world)


def test_album_summaries_follow_sql_by_hand(world):
    writer.write_outcomes(world, "v1", BATCH)
    # Deleted and restored by status alone, tags kept: hidden, then back.
    world.execute(text("UPDATE photos SET status = 'deleted' WHERE photo_id IN ('p1', 'p3')"))
    assert summary(world) == [("Paris", 1, 2, [("Eiffel Tower", 2, "p4")])]
    assert_albums_match_tags(world)
    world.execute(text("UPDATE photos SET status = 'tagged' WHERE photo_id = 'p1'"))
    assert_albums_match_tags(world)
    # A new upload time, a new score, a moved tag, a deleted photo row.
    world.execute(text("UPDATE photos SET uploaded_at = uploaded_at + interval '1 day' WHERE photo_id = 'p2'"))
    world.execute(text("UPDATE photo_tags SET score = 0.99 WHERE photo_id = 'p2' AND landmark_id = 1"))
    assert summary(world)[0][3][0] == ("Eiffel Tower", 3, "p2")
    assert_albums_match_tags(world)
    world.execute(text("UPDATE photo_tags SET landmark_id = 4 WHERE photo_id = 'p2'"))
    assert_albums_match_tags(world)
    world.execute(text("DELETE FROM photos WHERE photo_id = 'p4'"))
    assert_albums_match_tags(world)
    # A landmark moved to another city (a catalogue fix) takes its albums along.
    writer.upsert_landmarks(world, [{**LANDMARKS[1], "city": "Versailles"}])
    assert [c.city for c in albums.attractions(world, "alice")] == ["Paris", "Versailles", "London"]
    assert_albums_match_tags(world)
    writer.upsert_landmarks(world, LANDMARKS)  # unchanged rows move nothing
    assert_albums_match_tags(world)


def test_album_summaries_survive_activation_changes(world):
    writer.register_model_version(world, "v2", **_model_args(checkpoint="/m/v2.pt"))
    writer.write_outcomes(world, "v1", BATCH)
    # v2 re-tags the same uploads (a backfill's events carry the upload times they were queued for).
    writer.write_outcomes(world, "v2", [tagged("p1", (3, 0.9), minutes=1, event="b1"),
                                        tagged("p2", (1, 0.4), (4, 0.8), minutes=2, event="b2")])
    before = summary(world)
    writer.activate_model_version(world, "v2")
    assert summary(world) == [("Paris", 1, 1, [("Eiffel Tower", 1, "p2")]),
                              ("Rome", 1, 1, [("Colosseum", 1, "p1")]),
                              ("London", 1, 1, [("Big Ben", 1, "p2")])]
    assert_albums_match_tags(world)
    writer.delete_photo(world, PhotoDeleted(event_id="d2", user_id="alice", photo_id="p2"))
    writer.activate_model_version(world, "v1")  # rollback: v1's albums, less the photo deleted meanwhile
    assert summary(world) == [("Paris", 2, 2, [("Eiffel Tower", 2, "p4"), ("Louvre", 1, "p1")]),
                              ("Rome", 1, 1, [("Colosseum", 1, "p3")])]
    assert before != summary(world)
    assert_albums_match_tags(world)
    world.execute(text("UPDATE model_versions SET is_active = false"))
    assert albums.attractions(world, "alice") == []


UPLOAD_REPLACED_0006 = "ALTER TABLE photos ADD COLUMN upload_replaced boolean NOT NULL DEFAULT false"
SHADOW_PHOTOS_0004 = "CREATE TABLE shadow_photos (user_id text, photo_id text)"


def test_album_summaries_are_rebuilt_by_the_migration(database_url, engine):
    with transaction(engine) as s:
        writer.upsert_landmarks(s, LANDMARKS)
        writer.register_model_version(s, "vm", activate=True, **_model_args())
        writer.write_outcomes(s, "vm", BATCH)
        expected = summary(s)
    try:
        migrate.downgrade(database_url, "0002")
        with transaction(engine) as s:  # written while no trigger kept the summaries
            s.execute(text(UPLOAD_REPLACED_0006))  # today's writer writes today's photos columns
            s.execute(text(SHADOW_PHOTOS_0004))  # and deletes a deleted photo's shadow verdicts
            writer.write_outcomes(s, "vm", [tagged("p8", (3, 0.95), minutes=8)])
            writer.delete_photo(s, PhotoDeleted(event_id="d-p4", user_id="alice", photo_id="p4"))
            s.execute(text("ALTER TABLE photos DROP COLUMN upload_replaced"))  # 0006 adds it back
            s.execute(text("DROP TABLE shadow_photos"))  # 0004 makes it
        migrate.upgrade(database_url, "head")
        with transaction(engine) as s:
            assert summary(s) == [("Paris", 2, 2, [("Eiffel Tower", 2, "p1"), ("Louvre", 1, "p1")]),
                                  ("Rome", 1, 2, [("Colosseum", 2, "p8")])]
            assert summary(s) != expected
            assert_albums_match_tags(s)
    finally:
        migrate.upgrade(database_url, "head")
        _truncate(engine)


def _truncate(engine) -> None:
    with transaction(engine) as s:
        s.execute(text(f"TRUNCATE {', '.join(TABLES)} CASCADE"))
        # The summaries go with the tags.
        assert s.scalar(text("SELECT count(*) FROM album_landmark_stats")) == 0
        assert s.scalar(text("SELECT count(*) FROM album_city_stats")) == 0


def test_concurrent_writers_of_one_album_lose_no_count(engine):
    import threading

    errors: list[BaseException] = []
    try:
        with transaction(engine) as s:
            writer.upsert_landmarks(s, LANDMARKS)
            writer.register_model_version(s, "vw", activate=True, **_model_args())
        first = Session(bind=engine)
        writer.write_outcomes(first, "vw", [tagged("a1", (1, 0.9), minutes=1, event="w-a1")])

        def second():
            try:
                with transaction(engine) as s:
                    writer.write_outcomes(s, "vw", [tagged("b1", (2, 0.8), (1, 0.7), minutes=2, event="w-b1")])
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        # The second writer waits on the first's lock of alice's Paris albums, then adds to its counts.
        worker = threading.Thread(target=second)
        worker.start()
        worker.join(0.5)
        assert worker.is_alive()
        first.commit()
        first.close()
        worker.join(10)
        assert not worker.is_alive() and errors == []
        with transaction(engine) as s:
            assert summary(s) == [("Paris", 2, 2, [("Eiffel Tower", 2, "a1"), ("Louvre", 1, "b1")])]
            assert_albums_match_tags(s)
    finally:
        _truncate(engine)


def test_a_moved_landmark_finds_its_albums_by_index(world):
    """The catalogue fix holds every tag writer back while it looks up the moved landmark's albums: that
    lookup must not scan every album summary of every user."""
    world.execute(text("SET LOCAL enable_seqscan = off"))  # the few test rows would make a scan cheapest
    plan = "\n".join(world.scalars(text(
        "EXPLAIN SELECT s.user_id, s.model_version FROM album_landmark_stats s WHERE s.landmark_id = 1")))
    assert "ix_album_landmark_stats_landmark" in plan, plan


# Thirty-six towns of two sights each.
TOWN_SIGHTS = [{"id": 100 + i, "name": f"Sight {i}", "city": f"Town {i // 2}", "country": "Testland", "region": 1,
                "lat": 10.0 + i, "lon": 20.0 + i} for i in range(72)]


def _photos_in_towns(session: Session, user: str, photos: range, sights: range = range(24),
                     version: str = "v1") -> None:
    """``user``'s photos ``c<k>`` for k in ``photos``, spread over ``sights`` (indexes of TOWN_SIGHTS, from
    an even one: whole towns): every fifth also shows the other sight of its town (it counts once there),
    every seventh a sight of the next town too."""
    writer.upsert_landmarks(session, TOWN_SIGHTS)
    outcomes = []
    for k in photos:
        sight = sights[k % len(sights)]
        tags = [(100 + sight, 0.5 + (k % 10) / 20)]
        if k % 5 == 0:
            tags.append((100 + (sight ^ 1), 0.4))
        if k % 7 == 0:
            tags.append((100 + sights[(k + 2) % len(sights)], 0.3))
        outcomes.append(tagged(f"c{k}", *tags, user=user, minutes=k))
    writer.write_outcomes(session, version, outcomes)


def _summary_rows(session: Session) -> dict[str, list[tuple]]:
    return {table: [tuple(r) for r in session.execute(text(f"SELECT * FROM {table} ORDER BY 1, 2, 3, 4"))]
            for table in ("album_landmark_stats", "album_city_stats")}


def test_album_summaries_equal_a_rebuild_after_re_tagging_and_deleting_across_cities(world):
    _photos_in_towns(world, "carol", range(480))
    writer.write_outcomes(world, "v1", [tagged("p1", (1, 0.9), (3, 0.8), minutes=1)])  # alice, beside carol
    # Photos moved between towns, given a second sight of their town, left with no landmark, and deleted:
    # towns lose and gain photos and landmarks, some empty out.
    writer.write_outcomes(world, "v1", [
        tagged("c0", (111, 0.99), minutes=0, event="move-c0"),
        tagged("c1", (101, 0.2), (100, 0.95), minutes=1, event="both-c1"),
        tagged("c13", (100, 0.7), (122, 0.9), (3, 0.6), minutes=13, event="three-c13"),
        PhotoOutcome(event=uploaded("c2", user="carol", minutes=2, event="none-c2"), status=PhotoStatus.NO_LANDMARK),
    ])
    for k in range(4, 480, 24):  # every photo of Sight 4 (Town 2)...
        writer.delete_photo(world, PhotoDeleted(event_id=f"del-c{k}", user_id="carol", photo_id=f"c{k}"))
    for k in range(5, 480, 24):  # ...and of Sight 5: Town 2 keeps only the photos tagged from elsewhere
        writer.delete_photo(world, PhotoDeleted(event_id=f"del-c{k}", user_id="carol", photo_id=f"c{k}"))
    world.execute(text("DELETE FROM photo_tags WHERE user_id = 'carol' AND landmark_id IN (106, 107)"))  # Town 3
    kept = _summary_rows(world)
    assert ("carol", "v1", "Testland", "Town 3") not in {row[:4] for row in kept["album_city_stats"]}

    world.execute(text("SELECT album_stats_rebuild()"))
    assert kept == _summary_rows(world)
    assert_albums_match_tags(world)


def _pages_read(session: Session, *tables: str) -> int:
    """Pages this transaction has asked for so far (from shared buffers or disk) of ``tables`` and their
    indexes."""
    return session.scalar(text(
        "SELECT CAST(sum(pg_stat_get_xact_blocks_fetched(c.oid)) AS bigint) FROM pg_class c "
        "WHERE c.oid = ANY (CAST(:tables AS regclass[])) "
        "   OR c.oid IN (SELECT indexrelid FROM pg_index WHERE indrelid = ANY (CAST(:tables AS regclass[])))"),
        {"tables": list(tables)})


TOWN_RECOUNT_READS = ("landmarks", "album_landmark_stats", "photo_tags", "photos")


def test_recounting_a_town_reads_as_much_however_many_other_towns_the_user_has(engine):
    """A tag removed (a photo deleted or re-tagged) recounts its towns under the user's album lock: that
    must read those towns' albums and tags, not every album and tag of the user once per town (which, for
    a heavy user, was 119 ms of a 150 ms batch at 3 M photos)."""
    catalogue = [{**TOWN_SIGHTS[0], "id": 1000 + i, "city": f"Village {i // 4}"} for i in range(4000)]
    try:
        with transaction(engine) as s:
            writer.upsert_landmarks(s, catalogue)
            writer.register_model_version(s, "vt", activate=True, **_model_args())
            # Many users of a photo or so, as the planner's statistics see them...
            writer.write_outcomes(s, "vt", [tagged("x", (1000 + (7 * i) % 4000, 0.5), user=f"u{i:05d}")
                                            for i in range(5000)])
            # ...and two heavy ones: carol in twelve towns, dave in the same twelve and twenty-four more.
            _photos_in_towns(s, "carol", range(480), version="vt")
            _photos_in_towns(s, "dave", range(480), version="vt")
            _photos_in_towns(s, "dave", range(480, 2880), sights=range(24, 72), version="vt")
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(text("VACUUM ANALYZE landmarks, photos, photo_tags, album_landmark_stats"))
        read = {}
        with engine.connect() as conn, Session(bind=conn) as s:
            for user in ("carol", "dave"):  # two towns where both have the same photos
                before = _pages_read(s, *TOWN_RECOUNT_READS)
                s.execute(text("SELECT album_stats_recount_cities(:users, :versions, :countries, :towns)"),
                          {"users": [user] * 2, "versions": ["vt"] * 2, "countries": ["Testland"] * 2,
                           "towns": ["Town 0", "Town 1"]})
                read[user] = _pages_read(s, *TOWN_RECOUNT_READS) - before
            s.rollback()
        assert read["dave"] <= read["carol"] * 1.2, f"pages read to recount two towns: {read}"
    finally:
        _truncate(engine)


def test_a_towns_landmarks_are_found_by_index(world):
    """The recount reaches a town's albums from its landmarks: finding them must not scan the catalogue."""
    world.execute(text("SET LOCAL enable_seqscan = off"))  # the few test rows would make a scan cheapest
    plan = "\n".join(world.scalars(text(
        "EXPLAIN SELECT id FROM landmarks WHERE country = 'France' AND city = 'Paris'")))
    assert "ix_landmarks_city" in plan, plan


def test_a_backfill_since_a_date_finds_its_photos_by_upload_time(world):
    """`landmarks backfill --since DATE` counts, then pages through, the photos uploaded since DATE: without
    an index on photos.uploaded_at each chunk read every photo (0.6-2 s a chunk at 3 M photos)."""
    world.execute(text("SET LOCAL enable_seqscan = off"))
    scope = backfill.Scope(since=T0 + timedelta(days=30))
    photos = Base.metadata.tables["photos"]
    total = select(func.count()).select_from(photos).where(*scope.where("v1"))
    plan = "\n".join(world.scalars(text("EXPLAIN " + str(total.compile(
        dialect=world.bind.dialect, compile_kwargs={"literal_binds": True})))))
    assert "ix_photos_upload_order" in plan, plan


def test_an_index_left_invalid_by_an_interrupted_upgrade_is_built_again(database_url, engine):
    """A CONCURRENTLY build that fails half-way (here: unique over equal upload times) leaves an invalid
    index of the name behind; the next upgrade replaces it instead of keeping it (IF NOT EXISTS)."""
    def index_state() -> tuple | None:
        with engine.connect() as conn:
            return conn.execute(text("SELECT indisvalid, indisunique FROM pg_index "
                                     "WHERE indexrelid = to_regclass('ix_photos_upload_order')")).one_or_none()

    try:
        migrate.downgrade(database_url, "0008")
        with transaction(engine) as s:
            s.execute(text("INSERT INTO photos (user_id, photo_id, uploaded_at, status) "
                           "VALUES ('erin', 'e1', :t, 'pending'), ('erin', 'e2', :t, 'pending')"), {"t": T0})
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            with pytest.raises(Exception, match="could not create unique index"):
                conn.execute(text("CREATE UNIQUE INDEX CONCURRENTLY ix_photos_upload_order ON photos (uploaded_at)"))
        assert index_state() == (False, True)
        migrate.upgrade(database_url, "head")
        assert index_state() == (True, False)
    finally:
        migrate.upgrade(database_url, "head")
        _truncate(engine)


def test_an_interrupted_since_backfill_starts_its_window_over_after_the_upgrade_to_upload_order(database_url,
                                                                                                engine):
    """0009 pages --since jobs in upload order: a running one's (user, photo) cursor would point anywhere in
    it, so it is forgotten (the job starts its window over, skipping photos processed since); the other
    jobs keep theirs."""
    jobs = {"since-running": ({"since": "2026-01-01T00:00:00+00:00"}, "running"),
            "since-done": ({"since": "2026-01-01T00:00:00+00:00"}, "done"),
            "user-running": ({"user": "erin"}, "running")}
    try:
        migrate.downgrade(database_url, "0008")
        with transaction(engine) as s:
            for name, (scope, status) in jobs.items():
                s.execute(text("INSERT INTO backfill_jobs (name, scope, status, cursor_user_id, cursor_photo_id) "
                               "VALUES (:n, CAST(:scope AS jsonb), :status, 'erin', 'e9')"),
                          {"n": name, "scope": json.dumps(scope), "status": status})
        migrate.upgrade(database_url, "head")
        with transaction(engine) as s:
            cursors = dict(s.execute(text("SELECT name, cursor_photo_id FROM backfill_jobs WHERE name = ANY(:n)"),
                                     {"n": list(jobs)}).all())
        assert cursors == {"since-running": None, "since-done": "e9", "user-running": "e9"}
    finally:
        migrate.upgrade(database_url, "head")
        with transaction(engine) as s:
            s.execute(text("DELETE FROM backfill_jobs WHERE name = ANY(:n)"), {"n": list(jobs)})


def test_moving_a_landmark_to_another_city_waits_for_a_writer_instead_of_deadlocking(engine):
    """A catalogue fix while a batch is between its photo upsert and its tag statements: the fix locks the
    tables in the writer's order (photos, then photo_tags), so it waits for the batch; in the other order
    PostgreSQL aborted one of them."""
    import threading

    with transaction(engine) as s:
        writer.upsert_landmarks(s, LANDMARKS)
        writer.register_model_version(s, "vc", activate=True, **_model_args())
        writer.write_outcomes(s, "vc", [tagged("c1", (1, 0.9), minutes=1, event="c-c1")])
    errors: list[BaseException] = []
    batch = Session(bind=engine)
    try:
        batch.execute(text("UPDATE photos SET processed_at = now() WHERE photo_id = 'c1'"))  # the photo upsert

        def move_the_eiffel_tower() -> None:
            try:
                with transaction(engine) as s:
                    s.execute(text("UPDATE landmarks SET city = 'Paris 7e' WHERE id = 1"))
            except BaseException as exc:  # noqa: BLE001 - reported by the main thread
                errors.append(exc)

        fix = threading.Thread(target=move_the_eiffel_tower)
        fix.start()
        fix.join(0.5)
        assert fix.is_alive(), "the catalogue fix did not wait for the batch"
        batch.execute(text("DELETE FROM photo_tags WHERE model_version = 'vc' AND photo_id = 'none'"))  # its tags
        batch.commit()
        fix.join(10)
        assert not fix.is_alive() and errors == []
        with transaction(engine) as s:
            assert summary(s) == [("Paris 7e", 1, 1, [("Eiffel Tower", 1, "c1")])]
    finally:
        batch.close()
        _truncate(engine)


def test_many_concurrent_writers_keep_summaries_exact(engine):
    import random
    import threading

    # Two users, few photos: batches keep re-tagging and deleting each other's photos and albums.
    users, photos_per_user, workers, batches = ["alice", "bob"], 40, 4, 25
    errors: list[BaseException] = []

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for step in range(batches):
            outcomes = [
                tagged(f"p{rng.randrange(photos_per_user)}",
                       *[(lm, round(rng.random(), 3)) for lm in rng.sample([1, 2, 3, 4], rng.randint(1, 2))],
                       user=rng.choice(users), minutes=rng.randrange(100), event=f"e{seed}-{step}-{i}")
                for i in range(rng.randint(1, 6))
            ]
            with transaction(engine) as s:
                writer.write_outcomes(s, "vs", outcomes)
            if rng.random() < 0.1:
                with transaction(engine) as s:
                    writer.delete_photo(s, PhotoDeleted(event_id=f"d{seed}-{step}", user_id=rng.choice(users),
                                                        photo_id=f"p{rng.randrange(photos_per_user)}"))

    def guarded(seed: int) -> None:
        try:
            work(seed)
        except BaseException as exc:  # noqa: BLE001 - a deadlock among them fails the test
            errors.append(exc)

    try:
        with transaction(engine) as s:
            writer.upsert_landmarks(s, LANDMARKS)
            writer.register_model_version(s, "vs", activate=True, **_model_args())
        threads = [threading.Thread(target=guarded, args=(seed,)) for seed in range(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors == [] and not any(t.is_alive() for t in threads)
        with transaction(engine) as s:
            assert s.scalar(text("SELECT count(*) FROM album_photos")) > 0
            assert_albums_match_tags(s)
    finally:
        _truncate(engine)


@pytest.mark.parametrize("per_statement", [1, 2, 50_000])  # a statement per landmark; uneven chunks; one
def test_landmarks_are_upserted_in_chunks_and_updated_in_place(session, monkeypatch, per_statement):
    monkeypatch.setattr(writer, "LANDMARKS_PER_STATEMENT", per_statement)
    assert writer.upsert_landmarks(session, LANDMARKS) == len(LANDMARKS)
    assert writer.upsert_landmarks(session, []) == 0
    moved = [{**row, "city": f"New {row['city']}", "lat": row["lat"] + 1} for row in LANDMARKS[:3]]
    writer.upsert_landmarks(session, moved)
    rows = session.execute(text("SELECT id, name, city, country, region, lat, lon FROM landmarks ORDER BY id")).all()
    expected = {row["id"]: row for row in LANDMARKS} | {row["id"]: row for row in moved}
    assert [tuple(r) for r in rows] == [tuple(expected[i][k] for k in ("id", "name", "city", "country", "region",
                                                                      "lat", "lon")) for i in sorted(expected)]
