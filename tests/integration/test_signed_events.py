"""A real worker with LANDMARKS_EVENT_SIGNING_KEY: signed events are processed, unsigned and forged ones
become validation failures with their reason, for uploads and deletions alike; `landmarks enqueue` signs."""

from __future__ import annotations

import subprocess
import sys
import uuid

import pytest
import sqlalchemy as sa
from celery import Celery

from shared.db.albums import photo_report
from shared.db.session import transaction
from shared.signing import sign_event

import ops_fleet as fleet

pytestmark = [pytest.mark.integration, pytest.mark.slow]
KEY = "test-signing-key-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict:
    return fleet.photo_set(tmp_path_factory.mktemp("photos"), n_landmarks=2, n_everyday=1)


@pytest.fixture(scope="module")
def model_version(photos, engine, milvus_uri, tmp_path_factory) -> str:
    return fleet.publish_tiny_model(photos, engine, milvus_uri, tmp_path_factory.mktemp("models"), "sig")


@pytest.fixture(scope="module")
def env(photos, database_url, broker_url, milvus_uri, tmp_path_factory) -> dict:
    return fleet.fleet_env(database_url, broker_url, milvus_uri, photos["root"], tmp_path_factory.mktemp("home"),
                           LANDMARKS_EVENT_SIGNING_KEY=KEY)


def _failures(engine, user: str) -> dict[str, tuple[str, str, str]]:
    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT event_id, task, stage, reason FROM failures WHERE user_id = :u"),
                            {"u": user}).all()
    return {r.event_id: (r.task, r.stage, r.reason) for r in rows}


def _processed(engine, user: str) -> int:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT count(*) FROM processed_events WHERE user_id = :u"),
                            {"u": user}).scalar_one()


def _status(engine, user: str, photo_id: str) -> str | None:
    with transaction(engine) as session:
        report = photo_report(session, user, photo_id)
    return report["status"] if report else None


def test_only_signed_events_are_acted_on(photos, model_version, env, engine, tmp_path):
    user = f"sig_{uuid.uuid4().hex[:6]}"
    key = KEY.encode()
    producer = Celery(broker=env["LANDMARKS_BROKER_URL"])
    producer.conf.update(task_serializer="json")
    send = lambda name, event: producer.send_task(name, args=[event], queue=env["LANDMARKS_QUEUE"])  # noqa: E731

    signed = sign_event(fleet.event(user, photos["firsts"][0]), key)
    unsigned = fleet.event(user, photos["firsts"][1])
    forged = {**sign_event(fleet.event(user, photos["everyday"][0]), key), "photo_id": signed["photo_id"]}
    wrong_key = sign_event(fleet.event(user, photos["firsts"][1]), b"another-key-entirely-0123456789")
    for event in (signed, unsigned, forged, wrong_key):  # one batch: the bad ones must not sink the good one
        send(fleet.UPLOADED, event)

    log = tmp_path / "worker.log"
    worker = fleet.start_worker(env, log)
    try:
        fleet.wait(lambda: _processed(engine, user) == 1 and len(_failures(engine, user)) == 3,
                   "the signed upload and three refusals", worker=worker)
        assert _status(engine, user, signed["photo_id"]) == "tagged"
        failures = _failures(engine, user)
        assert failures[unsigned["event_id"]] == (fleet.UPLOADED, "validate",
                                                  "unsigned event refused: signing is required")
        for bad in (forged, wrong_key):
            assert failures[bad["event_id"]] == (fleet.UPLOADED, "validate",
                                                 "forged or altered event: signature mismatch")

        # Deletions too: an unsigned or forged one deletes nothing, a signed one deletes.
        deletion = {"event_id": uuid.uuid4().hex, "user_id": user, "photo_id": signed["photo_id"]}
        forged_deletion = {**sign_event({**deletion, "photo_id": "other"}, key), "photo_id": signed["photo_id"],
                           "event_id": uuid.uuid4().hex}
        send(fleet.DELETED, deletion)
        send(fleet.DELETED, forged_deletion)
        # The signature covers the body, not the task: the signed upload re-sent as a deletion (by anyone who can
        # write to the broker) carries a valid signature, and must still delete nothing.
        send(fleet.DELETED, signed)
        fleet.wait(lambda: len(_failures(engine, user)) == 6, "three refused deletions", worker=worker)
        failures = _failures(engine, user)
        assert failures[deletion["event_id"]][:2] == (fleet.DELETED, "validate")
        assert failures[deletion["event_id"]][2].startswith("unsigned event refused")
        assert failures[forged_deletion["event_id"]][2] == "forged or altered event: signature mismatch"
        assert failures[signed["event_id"]][:2] == (fleet.DELETED, "validate")
        assert "a deletion must not carry an upload's fields" in failures[signed["event_id"]][2]
        assert _status(engine, user, signed["photo_id"]) == "tagged"
        send(fleet.DELETED, sign_event(deletion, key))
        fleet.wait(lambda: _status(engine, user, signed["photo_id"]) == "deleted", "the signed deletion",
                   worker=worker)

        # The CLI producer signs with the same key, so its events go through.
        cli_user = f"{user}_cli"
        subprocess.run([sys.executable, "-m", "shared.cli", "enqueue", str(photos["firsts"][1]),
                        "--user", cli_user, "--json"], env=env, check=True, capture_output=True, timeout=180)
        fleet.wait(lambda: _processed(engine, cli_user) == 1, "the CLI's upload", worker=worker)
        assert _failures(engine, cli_user) == {}
    finally:
        fleet.stop(worker)
        producer.close()
    assert "event signing is off" not in log.read_text(errors="replace")  # it is on: no warning saying otherwise
    assert KEY not in log.read_text(errors="replace")
