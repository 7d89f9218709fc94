"""`landmarks prune-ledger`: the processed_events ledger loses its events older than the window, in short
batches, never within the broker's redelivery horizon; and an event redelivered after its row was pruned
changes nothing a user would see."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from shared.db import writer
from shared.db.session import transaction
from shared.errors import Stage
from shared.events import GeoPoint, PhotoDeleted, PhotoUploaded
from shared.outcomes import Failure, GpsSource, Method, PhotoOutcome, PhotoStatus, Tag

pytestmark = pytest.mark.integration

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
LANDMARKS = [{"id": 9101, "name": "Old Bridge", "city": "Mostar", "country": "Bosnia", "region": 2,
              "lat": 43.337, "lon": 17.815},
             {"id": 9102, "name": "Stari Grad", "city": "Mostar", "country": "Bosnia", "region": 2,
              "lat": 43.338, "lon": 17.813}]


@pytest.fixture
def ledger(engine):
    """A user of its own with a registered, active version; yields (user, version)."""
    user, version = f"pl_{uuid.uuid4().hex[:8]}", f"pl_v_{uuid.uuid4().hex[:6]}"
    with transaction(engine) as s:
        before = s.scalar(sa.text("SELECT version FROM model_versions WHERE is_active"))
        writer.upsert_landmarks(s, LANDMARKS)
        writer.register_model_version(s, version, activate=True, backbone="tiny", embedding_dim=8, t_geo=0.5,
                                      t_global=0.5, t_ref=0.5, checkpoint="/nowhere.pt", metrics={})
    yield user, version
    with transaction(engine) as s:
        if before is not None:
            writer.activate_model_version(s, before)


def _upload(user: str, photo: str, *, minutes: int = 0, event: str | None = None) -> PhotoUploaded:
    return PhotoUploaded(event_id=event or f"{user}-up-{photo}-{minutes}", user_id=user, photo_id=photo,
                         uri=f"file:///photos/{user}/{photo}-{minutes}.jpg",
                         uploaded_at=T0 + timedelta(minutes=minutes), gps=GeoPoint(lat=43.337, lon=17.815))


def _tagged(event: PhotoUploaded, *landmarks: int) -> PhotoOutcome:
    return PhotoOutcome(event=event, status=PhotoStatus.TAGGED, gps=event.gps, gps_source=GpsSource.EVENT,
                        tags=[Tag(landmark_id=lm, score=0.9 - 0.1 * k, method=Method.GEO)
                              for k, lm in enumerate(landmarks)])


def _age(engine, user: str, days: int, *event_ids: str) -> None:
    """As if these events of ``user`` (all of them, given none) had been applied ``days`` ago."""
    with transaction(engine) as s:
        s.execute(sa.text("UPDATE processed_events SET processed_at = now() - make_interval(days => :days) "
                          "WHERE user_id = :user AND (:every OR event_id = ANY (CAST(:ids AS text[])))"),
                  {"days": days, "user": user, "every": not event_ids, "ids": list(event_ids)})


def _ledger(engine, user: str) -> set[str]:
    with engine.connect() as conn:
        return set(conn.scalars(sa.text("SELECT event_id FROM processed_events WHERE user_id = :u"), {"u": user}))


def _landmarks(tmp_path, database_url: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "LANDMARKS_DATABASE_URL": database_url, "LANDMARKS_HOME": str(tmp_path / "home"),
                   **env}
    return subprocess.run([sys.executable, "-m", "shared.cli", "prune-ledger", *args], env=environment,
                          capture_output=True, text=True, timeout=120)


def _photo_and_tags(engine, user: str) -> list[tuple]:
    with engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(
            "SELECT p.photo_id, p.status, p.uri, p.uploaded_at, p.deleted_at, t.landmark_id, t.score FROM photos p "
            "LEFT JOIN photo_tags t ON t.user_id = p.user_id AND t.photo_id = p.photo_id "
            "WHERE p.user_id = :u ORDER BY 1, 6"), {"u": user})]


def _albums(engine, user: str) -> list[list[tuple]]:
    """The user's landmark albums and cities, as the album service reads them."""
    with engine.connect() as conn:
        return [[tuple(r) for r in conn.execute(sa.text(f"SELECT * FROM {view} WHERE user_id = :u ORDER BY 2, 3"),
                                                {"u": user})]
                for view in ("album_landmarks", "album_cities")]


def test_events_older_than_the_window_are_deleted_in_batches(engine, database_url, ledger, tmp_path):
    user, version = ledger
    with transaction(engine) as s:
        writer.write_outcomes(s, version, [_tagged(_upload(user, f"p{k}"), 9101) for k in range(7)])
    events = sorted(_ledger(engine, user))
    _age(engine, user, 40, *events[:5])
    _age(engine, user, 20, events[5])  # inside a 30-day window; the last one is today's

    done = _landmarks(tmp_path, database_url, "--older-than", "30", "--batch", "2")
    assert done.returncode == 0, done.stderr
    assert "deleted: 5" in done.stdout.splitlines()
    assert "events deleted" in done.stderr  # progress, batch by batch
    assert _ledger(engine, user) == set(events[5:])

    again = _landmarks(tmp_path, database_url, "--older-than", "30", "--json")
    assert again.returncode == 0, again.stderr
    answer = json.loads(again.stdout.strip().splitlines()[-1])
    assert answer["ok"] is True and answer["deleted"] == 0 and answer["dry_run"] is False


def test_a_dry_run_counts_and_deletes_nothing(engine, database_url, ledger, tmp_path):
    user, version = ledger
    with transaction(engine) as s:
        writer.write_outcomes(s, version, [_tagged(_upload(user, f"p{k}"), 9101) for k in range(3)])
    _age(engine, user, 100)
    events = _ledger(engine, user)

    done = _landmarks(tmp_path, database_url, "--older-than", "90", "--dry-run", "--json")
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["dry_run"] is True and answer["deleted"] == 0 and answer["would_delete"] == 3
    assert _ledger(engine, user) == events


@pytest.mark.parametrize("days, env, horizon", [
    ("3", {}, "7 days"),  # shorter than the floor
    ("10", {"LANDMARKS_VISIBILITY_TIMEOUT_S": str(20 * 86400)}, "LANDMARKS_VISIBILITY_TIMEOUT_S"),
])
def test_a_window_within_the_redelivery_horizon_is_refused(engine, database_url, ledger, tmp_path, days, env,
                                                           horizon):
    user, version = ledger
    with transaction(engine) as s:
        writer.write_outcomes(s, version, [_tagged(_upload(user, "p0"), 9101)])
    _age(engine, user, 15)
    events = _ledger(engine, user)

    done = _landmarks(tmp_path, database_url, "--older-than", days, **env)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and horizon in done.stderr, done.stderr
    assert _ledger(engine, user) == events


def test_a_batch_below_one_is_refused(database_url, tmp_path):
    done = _landmarks(tmp_path, database_url, "--older-than", "30", "--batch", "0")
    assert done.returncode == 2 and "--batch" in done.stderr


def test_the_old_events_are_found_by_the_brin_index(engine):
    """The prune's search for old events reads the old block ranges, not the whole ledger."""
    from shared.db.ledger import OLD_EVENTS_AFTER
    with engine.connect() as conn:
        conn.execute(sa.text("SET enable_seqscan = off"))  # the few test rows would make a scan cheapest
        conn.execute(sa.text("SET enable_tidscan = off"))  # likewise the scan from the last block pruned
        plan = "\n".join(conn.scalars(sa.text(f"EXPLAIN {OLD_EVENTS_AFTER.text}"),
                                      {"cutoff": datetime.now(UTC) - timedelta(days=30), "after": "(0,0)",
                                       "batch": 1000}))
        conn.rollback()
    assert "ix_processed_events_processed_at" in plan, plan


def test_an_event_redelivered_after_its_ledger_row_was_pruned_changes_nothing_a_user_sees(
        engine, database_url, ledger, tmp_path):
    """Without its ledger row an event is applied again, and the writer's own rules make that harmless:
    * the upload the photo holds, redelivered, writes the same photo row and tags (processed_at aside);
    * the same upload failing this time (a storage outage) keeps the verdict (its failure is recorded);
    * an older upload of a photo uploaded again since is refused (uploaded_at ordering, as _supersedes);
    * an upload of a deleted photo leaves the tombstone, and a deletion redelivered keeps it as it was."""
    user, version = ledger
    same, flaky, replaced, deleted = (_upload(user, photo) for photo in ("same", "flaky", "replaced", "deleted"))
    newer = _upload(user, "replaced", minutes=30)
    removal = PhotoDeleted(event_id=f"{user}-del", user_id=user, photo_id="deleted")
    with transaction(engine) as s:
        writer.write_outcomes(s, version, [_tagged(same, 9101, 9102), _tagged(flaky, 9102),
                                           _tagged(replaced, 9101), _tagged(deleted, 9102)])
    with transaction(engine) as s:
        writer.write_outcomes(s, version, [_tagged(newer, 9102)])
        writer.delete_photo(s, removal)
    before, albums_before = _photo_and_tags(engine, user), _albums(engine, user)
    _age(engine, user, 60)
    assert _landmarks(tmp_path, database_url, "--older-than", "30").returncode == 0
    assert _ledger(engine, user) == set()

    with transaction(engine) as s:
        # The same verdicts again, as a redelivery carries them (the worker re-runs the same photo).
        applied = writer.write_outcomes(s, version, [
            _tagged(same, 9101, 9102), _tagged(replaced, 9101), _tagged(deleted, 9102),
            PhotoOutcome(event=flaky, status=PhotoStatus.FAILED, failure=Failure(Stage.FETCH, "storage 503"))])
        assert writer.delete_photo(s, removal) is True  # not in the ledger any more: applied again
    assert applied == 1  # only the upload the photo still holds, with its verdict
    assert _photo_and_tags(engine, user) == before
    assert _albums(engine, user) == albums_before
    with engine.connect() as conn:
        assert conn.scalar(sa.text("SELECT count(*) FROM failures WHERE event_id = :e"), {"e": flaky.event_id}) == 1
